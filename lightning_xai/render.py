"""Turn attribution maps and inputs into images: colour maps, percentile clipping, overlays, grids.

Everything here is torch (colour-map tables come from matplotlib once, then are cached as tensors),
so a grid of 64 maps renders in milliseconds. Images are float tensors ``(3, H, W)`` in ``[0, 1]``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import expected

SEQUENTIAL_CMAP = "inferno"
DIVERGING_CMAP = "RdBu_r"


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
    """Map values in ``[0, 1]`` of shape ``(N, H, W)`` to RGB images ``(N, 3, H, W)``."""
    table = _colormap_table(cmap).to(values.device)
    idx = (values.float().clamp(0, 1) * 255).round().long()
    return table[idx].permute(0, 3, 1, 2).contiguous()


def normalize_maps(maps: Tensor, signed: bool, outlier_perc: float = 1.0) -> Tensor:
    """Reduce maps ``(N, C, H, W)`` to ``(N, H, W)`` and scale each to ``[0, 1]``.

    Channels are summed (signed) or their absolute values summed (unsigned). Each map is divided by
    its ``100 - outlier_perc`` percentile of ``|value|`` and clipped, so a few extreme pixels do not
    wash out the rest. Signed maps are mapped to ``[0, 1]`` with 0.5 for zero (diverging colour map).
    """
    maps = maps.detach().float()
    if maps.ndim == 4:
        maps = maps.sum(1) if signed else maps.abs().sum(1)
    elif maps.ndim != 3:
        raise ValueError(expected("maps", "a tensor of shape (N, C, H, W) or (N, H, W)", maps))
    if not signed:
        maps = maps.abs()
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    flat = maps.abs().flatten(1)
    q = 1.0 - outlier_perc / 100.0
    scale = torch.quantile(flat, q, dim=1, interpolation="lower").clamp_min(1e-12).view(-1, 1, 1)
    scaled = (maps / scale).clamp(-1, 1)
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


def overlay(images: Tensor, heat: Tensor, alpha: float = 0.6) -> Tensor:
    """Blend RGB heatmaps over grey copies of RGB images (both ``(N, 3, H, W)`` in ``[0, 1]``)."""
    grey = images.mean(1, keepdim=True).repeat(1, 3, 1, 1)
    return ((1 - alpha) * grey + alpha * heat).clamp(0, 1)


def upscale(images: Tensor, min_side: int = 64) -> Tensor:
    """Nearest-neighbour upscale ``(N, C, H, W)`` by an integer factor so the short side is ``>= min_side``."""
    side = min(images.shape[-2:])
    factor = max(1, -(-min_side // max(side, 1)))
    if factor == 1:
        return images
    n, c, h, w = images.shape  # a strided copy: much faster than F.interpolate(mode="nearest") on CPU
    return images[:, :, :, None, :, None].expand(n, c, h, factor, w, factor).reshape(n, c, h * factor, w * factor)


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


def attribution_grid(
    inputs: Tensor,
    maps: Sequence[Tensor],
    signed: Sequence[bool],
    denormalize: Optional[Callable[[Tensor], Tensor]] = None,
    outlier_perc: float = 1.0,
    alpha: float = 0.6,
    min_side: int = 64,
    padding: int = 2,
    show_raw: bool = True,
) -> Tensor:
    """A grid with a row per sample: the input, then for each map the heatmap alone (``show_raw``) and overlaid.

    Args:
        inputs: images ``(N, C, H, W)``.
        maps: one attribution tensor per column, each ``(N, C', H, W)`` (``C'`` is ``C`` or 1).
        signed: per column, whether to use the diverging colour map (signed) or the sequential one.
        denormalize: maps normalised inputs back to display values.
        outlier_perc: percentile of the largest ``|values|`` clipped per map.
        alpha: heatmap weight in the overlay.
        min_side: cells are upscaled (nearest) so their short side is at least this.
        padding: pixels between cells.
        show_raw: add a column with the coloured map alone before each overlay.

    Returns:
        ``(3, H', W')`` in ``[0, 1]``.
    """
    base = to_display(inputs, denormalize)
    columns = [base]
    for attr, is_signed in zip(maps, signed):
        if attr.shape[-2:] != inputs.shape[-2:]:
            attr = F.interpolate(attr.float(), size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        heat = apply_colormap(normalize_maps(attr, is_signed, outlier_perc), DIVERGING_CMAP if is_signed else SEQUENTIAL_CMAP)
        if show_raw:
            columns.append(heat)
        columns.append(overlay(base, heat, alpha))
    cells = torch.stack([upscale(c, min_side) for c in columns], dim=1)  # (N, cols, 3, H, W)
    return make_grid(cells, padding=padding)


def image_grid(images: Tensor, ncols: Optional[int] = None, denormalize: Optional[Callable[[Tensor], Tensor]] = None,
               min_side: int = 64, padding: int = 2) -> Tensor:
    """Tile images ``(K, C, H, W)`` into a grid ``(3, H', W')`` (blank cells fill the last row)."""
    disp = upscale(to_display(images, denormalize), min_side)
    k = disp.shape[0]
    ncols = ncols or min(k, 10)
    nrows = -(-k // ncols)
    blank = torch.ones((nrows * ncols - k,) + tuple(disp.shape[1:]), dtype=disp.dtype)
    cells = torch.cat([disp, blank]).view(nrows, ncols, *disp.shape[1:])
    return make_grid(cells, padding=padding)
