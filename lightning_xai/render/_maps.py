"""Maps and inputs as pixels: colour maps, the colour scale of attribution maps, overlays, cell sizes.

Inputs and outputs are torch tensors (colour-map tables come from matplotlib once, then are cached), so a
grid of 64 maps renders in milliseconds. Images are float tensors ``(3, H, W)`` or ``(N, 3, H, W)`` in
``[0, 1]``. The table lookups and square roots run in numpy: torch runs those kernels in parallel even on a
few thousand values, and on busy cores each call then waits milliseconds for a second thread; what stays in torch
runs with one intra-op thread (:func:`one_thread`).
"""
from __future__ import annotations

import contextlib
import functools
from functools import lru_cache
from typing import Any, Callable, Iterator, Optional, Tuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import expected

SEQUENTIAL_CMAP = "inferno"
DIVERGING_CMAP = "RdBu_r"
CELL_MIN = 48  # px: small inputs (8x8 digits) are upscaled by an integer factor to at least this side
CELL_MAX = 128  # px: larger inputs are shrunk (antialiased) to this side, so a grid stays a figure, not a poster

_F = TypeVar("_F", bound=Callable[..., Any])


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch's intra-op threads set to one inside the block, the previous number restored after (also on error).

    Drawing runs element-wise operations on a few thousand to a few hundred thousand values; torch runs each in
    parallel, and on cores shared with other work every such call then waits for its second thread. An attribution
    figure of 32 images of 3x32x32 took 93 ms with 2 threads on a busy 2-core machine and 23 ms with one
    (``bench/render.py --threads``); the figure is the same.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single_threaded(fn: _F) -> _F:
    """``fn`` run inside :func:`one_thread`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_thread():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@lru_cache(maxsize=16)
def _colormap_table(name: str) -> Tensor:
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as err:
        raise ValueError(expected("cmap", "a matplotlib colour map name such as 'inferno' or 'RdBu_r'", name)) from err
    table = cmap(torch.linspace(0, 1, 256).numpy())[:, :3]
    return torch.tensor(table, dtype=torch.float32)  # (256, 3)


def apply_colormap(values: Tensor, cmap: str = SEQUENTIAL_CMAP) -> Tensor:
    """Map values in ``[0, 1]`` of shape ``(N, H, W)`` to RGB images ``(N, 3, H, W)`` (NaN as 0)."""
    table = _colormap_table(cmap).numpy()
    v = np.nan_to_num(values.detach().float().cpu().numpy(), nan=0.0)
    idx = np.rint(np.clip(v, 0.0, 1.0) * 255).astype(np.intp)
    rgb = np.ascontiguousarray(np.moveaxis(table[idx], -1, 1))  # (N, 3, H, W)
    return torch.from_numpy(rgb).to(values.device)


def reduce_maps(maps: Tensor, signed: bool) -> Tensor:
    """Maps ``(N, C, H, W)`` or ``(N, H, W)`` as one value per pixel ``(N, H, W)``, NaN/inf as 0.

    Channels are summed (signed) or their absolute values summed (unsigned).
    """
    maps = maps.detach().float()
    if maps.ndim == 4:
        maps = maps.sum(1) if signed else maps.abs().sum(1)
    elif maps.ndim != 3:
        raise ValueError(expected("maps", "a tensor of shape (N, C, H, W) or (N, H, W)", maps))
    if not signed:
        maps = maps.abs()
    return torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)


def share_maps(maps: Tensor, signed: bool, size: Optional[Tuple[int, int]] = None) -> Tensor:
    """Each pixel's share of its map's total ``|attribution|``, in multiples of the uniform share ``(N, H, W)``.

    .. math:: s_{ij} = \\frac{a_{ij}}{\\frac{1}{HW}\\sum_{kl} |a_{kl}|}

    so a map spread evenly is 1 everywhere and a pixel at 5 holds five times its even share. The unit does
    not change with the size of the gradients, which grows several-fold as a model trains
    (docs/attribution.md#colour-scale), so a scale in this unit means the same at every epoch and for every
    sample. An all-zero map stays 0. ``size``: resize the maps (bilinear) to ``(H, W)`` first, e.g. a Grad-CAM
    map to its input's size.
    """
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = maps.detach().float()
        maps = F.interpolate(maps if maps.ndim == 4 else maps.unsqueeze(1), size=tuple(size), mode="bilinear",
                             align_corners=False)
    a = reduce_maps(maps, signed)
    mean = a.abs().flatten(1).mean(1).view(-1, 1, 1)
    return torch.where(mean > 0, a / mean.clamp_min(1e-30), torch.zeros_like(a))


def robust_max(values: Tensor, outlier_perc: float = 1.0) -> float:
    """The ``100 - outlier_perc`` percentile of ``|values|`` over all entries (1.0 when that is 0 or not finite)."""
    flat = torch.nan_to_num(values.detach().float().abs().flatten(), nan=0.0, posinf=0.0)
    if flat.numel() > 1_000_000:  # torch.quantile's limit on the input size: a strided subsample is as good here
        flat = flat[:: -(-flat.numel() // 1_000_000)]
    q = float(torch.quantile(flat, 1.0 - outlier_perc / 100.0, interpolation="lower")) if flat.numel() else 0.0
    return q if q > 0 and q == q and q != float("inf") else 1.0


def normalize_maps(maps: Tensor, signed: bool, outlier_perc: float = 1.0, scale: Optional[float] = None) -> Tensor:
    """Reduce maps ``(N, C, H, W)`` to ``(N, H, W)`` and scale them to ``[0, 1]``.

    With ``scale=None`` each map is divided by its own ``100 - outlier_perc`` percentile of ``|value|``
    (per-sample scale), else every map by ``scale``; values beyond the scale are clipped, so a few
    extreme pixels do not wash out the rest. Signed maps are mapped to ``[0, 1]`` with 0.5 for zero
    (diverging colour map).
    """
    maps = reduce_maps(maps, signed)
    if scale is None:
        q = 1.0 - outlier_perc / 100.0
        per = torch.quantile(maps.abs().flatten(1), q, dim=1, interpolation="lower").clamp_min(1e-12).view(-1, 1, 1)
    else:
        per = torch.tensor(float(scale)).clamp_min(1e-12)
    scaled = (maps / per).clamp(-1, 1)
    return scaled * 0.5 + 0.5 if signed else scaled


def to_display(inputs: Tensor, denormalize: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Inputs ``(N, C, H, W)`` as RGB in ``[0, 1]``: grayscale is repeated; out-of-range data is min-max scaled."""
    x = inputs.detach().float()
    if denormalize is not None:
        x = denormalize(x)
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if x.ndim != 4:
        raise ValueError(expected("inputs", "images of shape (N, C, H, W)", x))
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        x = x.mean(1, keepdim=True).repeat(1, 3, 1, 1)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    out_of_range = (lo < 0) | (hi > 1)
    scaled = (x - lo) / (hi - lo).clamp_min(1e-12)
    return torch.where(out_of_range, scaled, x).clamp(0, 1)


def heat(values: Tensor, signed: bool) -> Tensor:
    """Scaled maps ``(N, H, W)`` in ``[0, 1]`` (0.5 is zero when signed) as RGB ``(N, 3, H, W)``."""
    return apply_colormap(values, DIVERGING_CMAP if signed else SEQUENTIAL_CMAP)


def overlay(images: Tensor, values: Tensor, signed: bool, strength: float = 0.9, floor: float = 0.2,
            colours: Optional[Tensor] = None) -> Tensor:
    """Heat over a dimmed grey copy of RGB images ``(N, 3, H, W)``, opaque where the map is strong.

    The input is shown as grey in ``[0.2, 0.8]`` (so colour inputs do not mix with the colour map, and
    neither black nor white inputs hide it). With ``m`` the map's magnitude in ``[0, 1]`` (``|2v - 1|``
    for signed maps), each pixel's colour is blended in with weight
    ``strength * clip((m - floor) / (1 - floor), 0, 1) ** 0.5``: below ``floor`` of the scale the input
    shows through unchanged, so weak attribution does not tint the whole image. ``colours``: the maps already
    coloured (:func:`heat`), if at hand.
    """
    grey = images.mean(1, keepdim=True) * 0.6 + 0.2  # (N, 1, H, W)
    m = (values * 2 - 1).abs() if signed else values
    ramp = ((m - floor) / (1 - floor)).clamp(0, 1).detach().float().cpu().numpy()
    alpha = torch.from_numpy(np.sqrt(ramp) * np.float32(strength)).to(images.device).unsqueeze(1)  # (N, 1, H, W)
    colours = heat(values, signed) if colours is None else colours
    return (grey * (1 - alpha) + colours * alpha).clamp(0, 1)


def upscale(images: Tensor, min_side: int = 64) -> Tensor:
    """Nearest-neighbour upscale ``(N, C, H, W)`` by an integer factor so the short side is ``>= min_side``."""
    side = min(images.shape[-2:])
    factor = max(1, -(-min_side // max(side, 1)))
    if factor == 1:
        return images
    big = images.detach().cpu().numpy().repeat(factor, axis=-2).repeat(factor, axis=-1)  # numpy: see the module doc
    return torch.from_numpy(big).to(images.device)


def fit_cells(images: Tensor, min_side: int = CELL_MIN, max_side: int = CELL_MAX) -> Tensor:
    """Cells ``(N, C, H, W)`` at a display size: small ones upscaled (nearest, integer factor) to a short side of at
    least ``min_side``, large ones shrunk (antialiased) to a long side of ``max_side``."""
    if max(images.shape[-2:]) > max_side:
        h, w = images.shape[-2:]
        size = (max(1, round(h * max_side / max(h, w))), max(1, round(w * max_side / max(h, w))))
        shrunk = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        return shrunk.clamp(0, 1)
    return upscale(images, min(min_side, max_side))


def make_grid(cells: Tensor, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Lay out cells ``(rows, cols, 3, H, W)`` as one image ``(3, H', W')`` with padding between cells."""
    if cells.ndim != 5:
        raise ValueError(expected("cells", "a tensor of shape (rows, cols, 3, H, W)", cells))
    rows, cols, c, h, w = cells.shape
    out = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value,
                     dtype=cells.dtype, device=cells.device)
    # every cell in one strided copy (a Python loop over the cells cost ~1 ms per 100 cells)
    body = out[:, padding:, padding:].view(c, rows, h + padding, cols, w + padding)
    body[:, :, :h, :, :w] = cells.permute(2, 0, 3, 1, 4)
    return out


def ring(masks: np.ndarray, width: int) -> np.ndarray:
    """The pixels within ``width`` of each region of boolean ``masks (N, H, W)`` but not in it (a square dilation,
    as shifted copies)."""
    h, w = masks.shape[-2:]
    padded = np.pad(masks, ((0, 0), (width, width), (width, width)))
    near = np.zeros_like(masks)
    for dy in range(2 * width + 1):
        for dx in range(2 * width + 1):
            near |= padded[:, dy:dy + h, dx:dx + w]
    return near & ~masks


def outline(images: Tensor, masks: Tensor, colour: Tuple[float, float, float], width: int = 2) -> Tensor:
    """Draw the outline of boolean ``masks (N, H, W)`` just outside each region into ``images (N, 3, H, W)``
    (a new tensor): pixels within ``width`` of the region but not in it take ``colour``."""
    around = ring(masks.detach().bool().cpu().numpy(), width)[:, None]  # (N, 1, H, W)
    paint = np.asarray(colour, dtype=np.float32).reshape(1, 3, 1, 1)
    drawn = np.where(around, paint, images.detach().float().cpu().numpy()).astype(np.float32)
    return torch.from_numpy(drawn).to(images.device)


def pool_to(values: Tensor, max_side: int) -> Tensor:
    """Maps ``(N, H, W)`` area-averaged so the long side is at most ``max_side`` (unchanged when it already is)."""
    h, w = values.shape[-2:]
    if max(h, w) <= max_side:
        return values
    size = (max(1, round(h * max_side / max(h, w))), max(1, round(w * max_side / max(h, w))))
    return F.adaptive_avg_pool2d(values.unsqueeze(1).float(), size).squeeze(1)
