"""The figures the callbacks log, each one readable on its own: a title saying what and which epoch,
column headers, labels under or beside every cell, and a colour bar with its scale. Each figure is drawn with one
torch thread (:func:`~lightning_xai.render._maps.one_thread`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import expected
from lightning_xai.render._canvas import RGB, Figure, Section, compose
from lightning_xai.render._canvas import to_uint8
from lightning_xai.render._maps import (CELL_MAX, CELL_MIN, DIVERGING_CMAP, SEQUENTIAL_CMAP, apply_colormap, fit_cells,
                                        heat, normalize_maps, overlay, ring, single_threaded, to_display)
from lightning_xai.render._sections import Bars, ColorBar, ColorBarSection, Grid, Legend, Matrix, Notes, Title

MAX_COLUMNS = 10  # epochs shown in an evolution figure; beyond this, spread evenly, first and latest kept
EVOLUTION_CELL = 32  # px: the evolution figure's smallest cell side (ten epochs of 8x8 inputs stay near the card width)
RED: RGB = (0.9, 0.1, 0.1)  # a region under test
CYAN: RGB = (0.0, 0.75, 1.0)  # control regions, a found hotspot
SHARE_UNIT = "× an even share of the map's |attribution| (1 = spread evenly)"


def spread(items: Sequence, k: int = MAX_COLUMNS) -> list:
    """At most ``k`` of ``items``, evenly spaced, the first and the last always kept.

    Example:
        >>> spread(list(range(10)), 4)
        [0, 3, 6, 9]
    """
    items = list(items)
    if len(items) <= k:
        return items
    if k == 1:
        return items[-1:]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def auto_columns(n: int) -> int:
    """Blocks per grid row for ``n`` blocks of about 3:5 (height:width), so the grid comes out a little taller
    than wide: it fits TensorBoard's card width without a tall strip."""
    return max(1, min(n, round(math.sqrt(n / 2.3))))


@single_threaded
def grid_figure(cells: Any, *, title: str, subtitle: str = "", headers: Sequence[str] = (),
                groups: Sequence[Tuple[int, int, str]] = (), captions: Optional[Sequence[Sequence[str]]] = None,
                cell_captions: Optional[Sequence[Sequence[Sequence[str]]]] = None,
                row_labels: Optional[Sequence[Sequence[str]]] = None, ncols: int = 1, dividers: Sequence[int] = (),
                frames: Optional[Sequence[Sequence[Optional[RGB]]]] = None,
                legend: Sequence[Tuple[RGB, str, str]] = (), colorbar: Optional[ColorBar] = None,
                bars: Optional[Sequence[Tuple[str, Sequence[Tuple[str, float, RGB]]]]] = None,
                notes: Sequence[str] = (), upscale: int = 1) -> Figure:
    """A titled grid of cells (a tensor ``(N, K, 3, h, w)`` in ``[0, 1]``, or uint8 pixels ``(N, K, h, w, 3)``)
    with headers, captions, frames, and optionally bars, a legend, a colour bar and notes below (see
    :class:`~lightning_xai.render._sections.Grid` for the grid's arguments).

    Example:
        >>> fig = grid_figure(torch.rand(4, 2, 3, 8, 8), title="demo", headers=["a", "b"], ncols=2,
        ...                   captions=[[f"sample {i}"] for i in range(4)])
        >>> fig.layout.columns, fig.layout.text("header")
        (2, ['a', 'b', 'a', 'b'])
    """
    sections: List[Section] = [Title(title, subtitle),
                               Grid(cells, headers=headers, groups=groups, captions=captions,
                                    cell_captions=cell_captions, row_labels=row_labels, ncols=ncols,
                                    dividers=dividers, frames=frames, upscale=upscale)]
    if bars:
        sections.append(Bars(bars))
    if legend:
        sections.append(Legend(legend))
    if colorbar is not None:
        sections.append(ColorBarSection(colorbar))
    if notes:
        sections.append(Notes(notes))
    return compose(sections)


def _display(images: Tensor, min_side: int = CELL_MIN) -> Tuple[Tensor, int]:
    """Cells and the integer factor the grid enlarges them by: small images stay small here (the grid repeats uint8
    pixels, cheaper than upscaling float tensors), large ones are shrunk now (see :func:`fit_cells`)."""
    h, w = images.shape[-2:]
    if max(h, w) > CELL_MAX:
        shrunk = fit_cells(images.flatten(0, -4), min_side=min_side)  # (N * K, 3, h', w')
        return shrunk.view(images.shape[:-3] + shrunk.shape[-3:]), 1
    return images, max(1, -(-min(min_side, CELL_MAX) // max(1, min(h, w))))


# --------------------------------------------------------------------------- attribution maps
def attribution_colorbar(signed: bool, scale: Optional[float], note: str = "") -> ColorBar:
    """The colour bar of attribution heatmaps: ``scale`` in units of :func:`~lightning_xai.render.share_maps`
    (values beyond it are clipped, shown by the ``≥`` of the last tick), or ``None`` for per-sample scaling."""
    cmap = DIVERGING_CMAP if signed else SEQUENTIAL_CMAP
    if scale is None:
        label = "each map scaled to its own 99th percentile of |attribution| (per-sample scale)" + note
        return ColorBar(cmap, -1.0 if signed else 0.0, 1.0, label,
                        ticks=[-1.0, 0.0, 1.0] if signed else [0.0, 1.0],
                        tick_labels=["-p99", "0", "+p99"] if signed else ["0", "p99 of the map"])
    lo = -scale if signed else 0.0
    ticks = [lo, (lo + scale) / 2, scale]
    labels = [f"≤{lo:.3g}" if signed else "0", f"{(lo + scale) / 2:.3g}", f"≥{scale:.3g}"]
    return ColorBar(cmap, lo, scale, SHARE_UNIT + note, ticks=ticks, tick_labels=labels)


def _scaled(values: Tensor, signed: bool, scale: Optional[float], outlier_perc: float) -> Tensor:
    return normalize_maps(values, signed, outlier_perc, scale=scale)  # (N, H, W) in [0, 1]


@single_threaded
def attribution_figure(inputs: Tensor, values: Tensor, signed: bool, *, title: str, subtitle: str = "",
                       captions: Optional[Sequence[Sequence[str]]] = None, scale: Optional[float] = None,
                       outlier_perc: float = 1.0, denormalize: Optional[Callable[[Tensor], Tensor]] = None,
                       ncols: Optional[int] = None, scale_note: str = "") -> Figure:
    """Per probe sample a block ``input | heatmap | overlay`` with its caption, blocks wrapped into ``ncols``
    columns, and the colour bar of the scale.

    Args:
        inputs: images ``(N, C, H, W)``.
        values: maps ``(N, H, W)`` in units of :func:`~lightning_xai.render.share_maps`, at the inputs' size.
        signed: diverging colour map centred on 0 (signed maps) or sequential from 0.
        scale: the value drawn at full colour (fixed scale), or ``None``: each map at its own
            ``100 - outlier_perc`` percentile (per-sample scale).
        captions: lines under each block (label, prediction, confidence, class explained).
        ncols: blocks per row (default :func:`auto_columns`).

    Example:
        >>> fig = attribution_figure(torch.rand(6, 1, 8, 8), torch.rand(6, 8, 8), False, title="saliency",
        ...                          scale=2.0, captions=[[f"label {i}"] for i in range(6)])
        >>> fig.layout.text("header")[:3], fig.layout.scale
        (['input', 'heatmap', 'overlay'], ('inferno', 0.0, 2.0))
    """
    if values.ndim != 3 or values.shape[0] != inputs.shape[0] or values.shape[-2:] != inputs.shape[-2:]:
        raise ValueError(expected("values", f"maps of shape ({inputs.shape[0]}, {inputs.shape[-2]}, "
                                            f"{inputs.shape[-1]})", values))
    base = to_display(inputs, denormalize)
    scaled = _scaled(values, signed, scale, outlier_perc)
    colours = heat(scaled, signed)
    cells, factor = _display(torch.stack([base, colours, overlay(base, scaled, signed, colours=colours)], dim=1))
    return grid_figure(cells, title=title, subtitle=subtitle, headers=["input", "heatmap", "overlay"],
                       captions=captions, ncols=ncols or auto_columns(inputs.shape[0]),
                       colorbar=attribution_colorbar(signed, scale, scale_note), upscale=factor)


@single_threaded
def evolution_figure(inputs: Tensor, columns: Sequence[Tuple[str, Tensor]], signed: bool, *, title: str,
                     subtitle: str = "", scale: Optional[float] = None, outlier_perc: float = 1.0,
                     row_labels: Optional[Sequence[Sequence[str]]] = None,
                     cell_captions: Optional[Sequence[Sequence[Sequence[str]]]] = None,
                     denormalize: Optional[Callable[[Tensor], Tensor]] = None, scale_note: str = "") -> Figure:
    """A row per sample: its input, then its heatmap (overlaid) in each column of ``columns``, ``(header, values
    (k, h, w))`` pairs such as one per explained epoch, all on one scale.

    ``values`` may be smaller than the inputs (kept pooled); they are resized to the inputs' size.
    ``cell_captions[i][j]`` are the lines under column ``j`` of row ``i`` (column 0 is the input).

    Example:
        >>> fig = evolution_figure(torch.rand(2, 1, 8, 8), [("0", torch.rand(2, 8, 8)), ("1", torch.rand(2, 8, 8))],
        ...                        False, title="saliency over epochs", scale=2.0)
        >>> fig.layout.text("header")
        ['input', '0', '1']
    """
    base = to_display(inputs, denormalize)
    cells = [base]
    for _, values in columns:
        values = values.float()
        if values.shape[-2:] != inputs.shape[-2:]:
            values = F.interpolate(values.unsqueeze(1), size=inputs.shape[-2:], mode="bilinear",
                                   align_corners=False).squeeze(1)
        cells.append(overlay(base, _scaled(values, signed, scale, outlier_perc), signed))
    stacked, factor = _display(torch.stack(cells, dim=1), EVOLUTION_CELL)  # (k, 1 + E, 3, h, w)
    groups = [(1, 1 + len(columns), "epoch")] if columns else []
    return grid_figure(stacked, title=title, subtitle=subtitle, headers=["input"] + [h for h, _ in columns],
                       groups=groups, row_labels=row_labels, cell_captions=cell_captions,
                       colorbar=attribution_colorbar(signed, scale, scale_note), upscale=factor)


# --------------------------------------------------------------------------- other figures
def _same_factor(small: Sequence[int], big: Sequence[int]) -> bool:
    """Whether ``big`` is ``small`` enlarged by one integer factor on both axes."""
    return big[0] % small[0] == 0 and big[1] % small[1] == 0 and big[0] // small[0] == big[1] // small[1]


@single_threaded
def matrix_figure(values: Tensor, row_names: Sequence[str], col_names: Sequence[str], *, title: str,
                  subtitle: str = "", cmap: str = "viridis", lo: float = 0.0, hi: float = 1.0, label: str = "",
                  fmt: str = "{:.2f}", corner: str = "", notes: Sequence[str] = ()) -> Figure:
    """A matrix of coloured cells with their values printed, row and column names, and a colour bar ``lo..hi``.

    Example:
        >>> fig = matrix_figure(torch.tensor([[0.5, 0.9]]), ["input"], ["untrained", "0"], title="probe accuracy")
        >>> fig.layout.text("value")
        ['0.50', '0.90']
    """
    sections: List[Section] = [Title(title, subtitle),
                               Matrix(values, row_names, col_names, cmap, lo, hi, fmt=fmt, corner=corner),
                               ColorBarSection(ColorBar(cmap, lo, hi, label))]
    if notes:
        sections.append(Notes(notes))
    return compose(sections)


def _pixels(images: Tensor, min_side: int) -> np.ndarray:
    """Images ``(N, 3, H, W)`` in ``[0, 1]`` as display cells ``(N, h, w, 3)`` uint8: small ones enlarged by an
    integer factor (repeated uint8 pixels), large ones shrunk (see :func:`fit_cells`)."""
    if max(images.shape[-2:]) > CELL_MAX:
        return to_uint8(fit_cells(images, min_side=min_side))
    factor = max(1, -(-min(min_side, CELL_MAX) // max(1, min(images.shape[-2:]))))
    return to_uint8(images).repeat(factor, axis=1).repeat(factor, axis=2)


def _mask_pixels(masks: Tensor, size: Sequence[int]) -> np.ndarray:
    """Boolean masks ``(N, H, W)`` at a cell size ``(h, w)`` (nearest neighbour)."""
    small = masks.detach().bool().cpu()
    if _same_factor(small.shape[-2:], size):
        f = size[0] // small.shape[-2]
        return small.numpy().repeat(f, axis=1).repeat(f, axis=2)
    return (F.interpolate(small.float().unsqueeze(1), size=tuple(size), mode="nearest").squeeze(1) > 0).numpy()


def _paint(pixels: np.ndarray, where: np.ndarray, colour: RGB) -> np.ndarray:
    return np.where(where[..., None], np.asarray([round(c * 255) for c in colour], dtype=np.uint8), pixels)


@single_threaded
def maps_figure(values: Tensor, *, title: str, subtitle: str = "", captions: Optional[Sequence[Sequence[str]]] = None,
                label: str = "", lo: float = 0.0, hi: Optional[float] = None, cmap: str = SEQUENTIAL_CMAP,
                masks: Optional[Tensor] = None, min_side: int = 96, ncols: Optional[int] = None,
                legend: Sequence[Tuple[RGB, str, str]] = (), notes: Sequence[str] = ()) -> Figure:
    """Maps ``(K, h, w)`` side by side on one colour scale (``hi`` default: their maximum), each with its caption.

    Example:
        >>> fig = maps_figure(torch.rand(3, 4, 4), title="class maps", captions=[["class 0"], ["class 1"], ["class 2"]])
        >>> fig.layout.text("caption")
        ['class 0', 'class 1', 'class 2']
    """
    top = float(values.max()) if hi is None else float(hi)
    top = top if top > lo else lo + 1.0
    scaled = ((values.detach().float() - lo) / (top - lo)).clamp(0, 1)
    cells = _pixels(apply_colormap(scaled, cmap), min_side)  # (K, h', w', 3)
    if masks is not None:
        around = ring(_mask_pixels(masks, cells.shape[1:3]), max(1, cells.shape[2] // 48))
        cells = _paint(cells, around, CYAN)
    cells = cells[:, None]  # (K, 1, h', w', 3)
    k = values.shape[0]
    return grid_figure(cells, title=title, subtitle=subtitle, cell_captions=None if captions is None else
                       [[list(c)] for c in captions], ncols=ncols or min(k, max(1, round(math.sqrt(k * 1.6)))),
                       legend=legend, colorbar=ColorBar(cmap, lo, top, label), notes=notes)


@single_threaded
def image_figure(images: Tensor, *, title: str, subtitle: str = "", captions: Optional[Sequence[Sequence[str]]] = None,
                 ncols: Optional[int] = None, min_side: int = CELL_MIN,
                 frames: Optional[Sequence[Optional[RGB]]] = None,
                 legend: Sequence[Tuple[RGB, str, str]] = (), notes: Sequence[str] = (),
                 denormalize: Optional[Callable[[Tensor], Tensor]] = None) -> Figure:
    """Images ``(K, C, H, W)`` in a grid, each with its caption lines below (class or channel, value reached).

    Example:
        >>> fig = image_figure(torch.rand(4, 1, 8, 8), title="class images",
        ...                    captions=[[f"class {i}"] for i in range(4)])
        >>> fig.layout.text("caption")
        ['class 0', 'class 1', 'class 2', 'class 3']
    """
    cells, factor = _display(to_display(images, denormalize).unsqueeze(1), min_side)  # (K, 1, 3, h, w)
    k = images.shape[0]
    return grid_figure(cells, title=title, subtitle=subtitle,
                       cell_captions=None if captions is None else [[list(c)] for c in captions],
                       ncols=ncols or min(k, max(1, round(math.sqrt(k * 1.6)))),
                       frames=None if frames is None else [[f] for f in frames], legend=legend, notes=notes,
                       upscale=factor)


@single_threaded
def evidence_figure(inputs: Tensor, masks: Tensor, controls: Tensor, edited: Tensor, *, title: str, subtitle: str = "",
                    captions: Optional[Sequence[Sequence[str]]] = None,
                    bars: Optional[Sequence[Tuple[str, Sequence[Tuple[str, float, RGB]]]]] = None,
                    notes: Sequence[str] = (), denormalize: Optional[Callable[[Tensor], Tensor]] = None) -> Figure:
    """What an intervention did, per sample: the input with its region (red) and control regions (cyan) outlined,
    and the input with the region replaced; then the measured effect as bars.

    Args:
        inputs: images ``(m, C, H, W)``; masks: the region ``(m, H, W)`` (bool); controls: control regions
            ``(m, K, H, W)`` (bool); edited: the inputs with the region replaced ``(m, C, H, W)``.
        captions: lines under each sample's pair; bars: ``(name, [(series, value, colour), ...])`` rows.

    Example:
        >>> m = torch.zeros(2, 8, 8, dtype=torch.bool); m[:, :2, :2] = True
        >>> fig = evidence_figure(torch.rand(2, 1, 8, 8), m, torch.zeros(2, 3, 8, 8, dtype=torch.bool),
        ...                       torch.rand(2, 1, 8, 8), title="check", bars=[("shift", [("region", 0.4, RED)])])
        >>> fig.layout.text("legend")
        ['region', 'control regions']
    """
    base = _pixels(to_display(inputs, denormalize), 2 * CELL_MIN)  # (m, h, w, 3): few samples, larger cells
    size = base.shape[1:3]
    width = max(2, size[1] // 32)
    region = ring(_mask_pixels(masks, size), width)
    shown = _paint(_paint(base, ring(_mask_pixels(controls.any(1), size), width), CYAN), region, RED)
    after = _paint(_pixels(to_display(edited, denormalize), 2 * CELL_MIN), region, RED)
    return grid_figure(np.stack([shown, after], 1), title=title, subtitle=subtitle,
                       headers=["regions", "region replaced"], captions=captions, ncols=2,
                       legend=[(RED, "region", "frame"), (CYAN, "control regions", "frame")], bars=bars, notes=notes)
