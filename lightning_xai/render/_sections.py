"""The bands a figure is stacked from: title, grid of cells, matrix, legend, colour bar, bars, notes.

Each is a :class:`~lightning_xai.render._canvas.Section`: it states the width it needs at a font size,
its height at a given width, and draws itself on a :class:`~lightning_xai.render._canvas.Canvas`,
recording its texts and regions in the figure's layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from lightning_xai._utils import expected
from lightning_xai.render._canvas import _HEAVY, GREY, RGB, Canvas, Section, line_height, text_width, to_uint8, wrap
from lightning_xai.render._maps import apply_colormap


class Title(Section):
    """A bold title and an optional grey subtitle, both wrapped to the figure's width."""

    def __init__(self, title: str, subtitle: str = "") -> None:
        self.title, self.subtitle = title, subtitle

    def _lines(self, f: int, width: int) -> Tuple[List[str], List[str]]:
        return (wrap(self.title, width, f + 2, bold=True),
                wrap(self.subtitle, width, f) if self.subtitle else [])

    def min_width(self, f: int) -> int:
        return 12 * f

    def height(self, f: int, width: int) -> int:
        title, sub = self._lines(f, width)
        return len(title) * line_height(f + 2) + len(sub) * line_height(f)

    def draw(self, canvas: Canvas, x: int, y: int, width: int, f: int) -> None:
        title, sub = self._lines(f, width)
        top = y
        for line in title:
            canvas.text(line, x, y, "title", size=f + 2, bold=True)
            y += line_height(f + 2)
        for line in sub:
            canvas.text(line, x, y, "subtitle", colour=GREY)
            y += line_height(f)
        canvas.layout.regions["title"] = (x, top, x + width, y)


class Notes(Section):
    """Grey explanatory text, wrapped."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = [line for line in lines if line]

    def min_width(self, f: int) -> int:
        return 12 * f

    def _wrapped(self, f: int, width: int) -> List[str]:
        return [part for line in self.lines for part in wrap(line, width, f - 1)]

    def height(self, f: int, width: int) -> int:
        return len(self._wrapped(f, width)) * line_height(f - 1)

    def draw(self, canvas: Canvas, x: int, y: int, width: int, f: int) -> None:
        top = y
        for line in self._wrapped(f, width):
            canvas.text(line, x, y, "note", size=f - 1, colour=GREY)
            y += line_height(f - 1)
        canvas.layout.regions["notes"] = (x, top, x + width, y)


@dataclass
class ColorBar:
    """A colour scale: values ``lo..hi`` through ``cmap``, a label, and tick values (default: lo, middle, hi)
    with optional tick labels."""

    cmap: str
    lo: float
    hi: float
    label: str
    ticks: Optional[Sequence[float]] = None
    tick_labels: Optional[Sequence[str]] = None


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if abs(value) >= 100 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


class ColorBarSection(Section):
    """A horizontal colour bar with its ticks below and its label above."""

    def __init__(self, bar: ColorBar) -> None:
        self.bar = bar
        ticks = list(bar.ticks) if bar.ticks is not None else [bar.lo, (bar.lo + bar.hi) / 2, bar.hi]
        labels = list(bar.tick_labels) if bar.tick_labels is not None else [_fmt(t) for t in ticks]
        self.ticks = list(zip(ticks, labels))

    def _bar_width(self, f: int, width: int) -> int:
        return max(8 * f, min(width - f, 18 * f))

    def min_width(self, f: int) -> int:
        return 8 * f + sum(text_width(label, f - 1) for _, label in self.ticks) // 2

    @staticmethod
    def _gap(f: int) -> int:
        """Pixels between the label's last line and the bar's frame, clear of the descenders (y, p, ')')."""
        return max(2, f // 4)

    def height(self, f: int, width: int) -> int:
        return (len(wrap(self.bar.label, width, f)) * line_height(f) + self._gap(f) + f + line_height(f - 1) + 3)

    def draw(self, canvas: Canvas, x: int, y: int, width: int, f: int) -> None:
        for line in wrap(self.bar.label, width, f):
            canvas.text(line, x, y, "colorbar")
            y += line_height(f)
        y += self._gap(f)
        bw, bh = self._bar_width(f, width), f
        x0 = x + text_width(self.ticks[0][1], f - 1) // 2  # room for the first tick's label
        bw = min(bw, width - (x0 - x) - text_width(self.ticks[-1][1], f - 1) // 2)
        ramp = apply_colormap(torch.linspace(0, 1, bw).view(1, 1, bw), self.bar.cmap)[0]  # (3, 1, bw)
        canvas.paste(ramp.expand(3, bh, bw), x0, y)
        canvas.frame((x0, y, x0 + bw, y + bh), GREY, 1)
        canvas.layout.regions["colorbar"] = (x0, y, x0 + bw, y + bh)
        canvas.layout.scale = (self.bar.cmap, float(self.bar.lo), float(self.bar.hi))
        span = (self.bar.hi - self.bar.lo) or 1.0
        for value, label in self.ticks:
            tx = x0 + (bw - 1) * min(1.0, max(0.0, (value - self.bar.lo) / span))
            canvas.fill((int(tx), y + bh, int(tx) + 1, y + bh + 3), GREY)
            canvas.text(label, tx, y + bh + 3, "tick", size=f - 1, align="centre")


class Legend(Section):
    """Colour keys in a row (wrapped): ``(colour, text, kind)`` with kind ``"frame"`` (a hollow square, as the
    cells' frames) or ``"swatch"`` (a filled one)."""

    def __init__(self, items: Sequence[Tuple[RGB, str, str]]) -> None:
        self.items = list(items)

    def _item_width(self, f: int, text: str) -> int:
        return f + f // 2 + text_width(text, f) + f

    def min_width(self, f: int) -> int:
        return max((self._item_width(f, t) for _, t, _ in self.items), default=0)

    def _rows(self, f: int, width: int) -> List[List[Tuple[RGB, str, str]]]:
        rows: List[List[Tuple[RGB, str, str]]] = [[]]
        used = 0
        for item in self.items:
            w = self._item_width(f, item[1])
            if rows[-1] and used + w > width:
                rows.append([])
                used = 0
            rows[-1].append(item)
            used += w
        return rows

    def height(self, f: int, width: int) -> int:
        return len(self._rows(f, width)) * line_height(f)

    def draw(self, canvas: Canvas, x: int, y: int, width: int, f: int) -> None:
        top = y
        for row in self._rows(f, width):
            cx = x
            for colour, text, kind in row:
                s = f - 2
                box = (cx + 2, y + 3, cx + 2 + s, y + 3 + s)
                if kind == "frame":
                    canvas.frame((box[0] + 2, box[1] + 2, box[2] - 2, box[3] - 2), colour, 3)
                else:
                    canvas.fill(box, colour)
                canvas.text(text, cx + f + f // 2, y, "legend")
                cx += self._item_width(f, text)
            y += line_height(f)
        canvas.layout.regions["legend"] = (x, top, x + width, y)


class Bars(Section):
    """Grouped horizontal bars with their values: ``rows = [(name, [(series, value, colour), ...]), ...]``; each
    group is scaled to its own largest ``|value|`` (the numbers are printed)."""

    def __init__(self, rows: Sequence[Tuple[str, Sequence[Tuple[str, float, RGB]]]], fmt: str = "{:.3f}") -> None:
        self.rows = [(name, list(series)) for name, series in rows]
        self.fmt = fmt

    def _label_widths(self, f: int) -> Tuple[int, int]:
        name_w = max((text_width(n, f) for n, _ in self.rows), default=0) + f // 2
        series_w = max((text_width(s, f - 1) for _, ser in self.rows for s, _, _ in ser), default=0) + f // 2
        return name_w, series_w

    def min_width(self, f: int) -> int:
        name_w, series_w = self._label_widths(f)
        return name_w + series_w + 8 * f + text_width("-0.000", f - 1)

    def height(self, f: int, width: int) -> int:
        return sum(len(ser) * line_height(f - 1) + f // 2 for _, ser in self.rows)

    def draw(self, canvas: Canvas, x: int, y: int, width: int, f: int) -> None:
        name_w, series_w = self._label_widths(f)
        value_w = text_width("-0.000", f - 1) + f // 2
        track = max(4 * f, width - name_w - series_w - value_w)
        top = y
        for name, series in self.rows:
            canvas.text(name, x, y, "bar")
            top_of_group = max((abs(v) for _, v, _ in series if v == v), default=0.0) or 1.0
            for label, value, colour in series:
                lh = line_height(f - 1)
                canvas.text(label, x + name_w, y, "bar", size=f - 1, colour=GREY)
                length = 0 if value != value else int(round(track * abs(value) / top_of_group))
                bx = x + name_w + series_w
                canvas.fill((bx, y + 2, bx + max(length, 1), y + lh - 2), colour)
                canvas.text("n/a" if value != value else self.fmt.format(value), bx + length + f // 3, y, "value",
                            size=f - 1)
                y += lh
            y += f // 2
        canvas.layout.regions["bars"] = (x, top, x + width, y)


class Grid(Section):
    """Blocks of image cells with their labels.

    ``cells (N, K, 3, h, w)``: ``N`` blocks of ``K`` cells each (a probe sample's input | heatmap | overlay,
    say), ``ncols`` blocks side by side per grid row (wrapping), ``headers`` (``K``) above each block column,
    ``groups`` ``(start, stop, text)`` spanning cell columns above the headers, ``captions`` (lines under each
    block), ``cell_captions`` (lines under each cell), ``row_labels`` (lines left of each block, one block per
    row only), ``frames`` (a colour or None per cell, drawn around it), ``dividers`` (cell columns preceded by a
    vertical rule). ``upscale``: cells are drawn that many times larger (nearest neighbour), so small inputs are
    enlarged on uint8 pixels rather than as float tensors.
    """

    def __init__(self, cells: Any, headers: Sequence[str] = (), groups: Sequence[Tuple[int, int, str]] = (),
                 captions: Optional[Sequence[Sequence[str]]] = None,
                 cell_captions: Optional[Sequence[Sequence[Sequence[str]]]] = None,
                 row_labels: Optional[Sequence[Sequence[str]]] = None, ncols: int = 1, dividers: Sequence[int] = (),
                 frames: Optional[Sequence[Sequence[Optional[RGB]]]] = None, upscale: int = 1) -> None:
        if isinstance(cells, np.ndarray):  # already pixels: uint8 (N, K, H, W, 3)
            if cells.ndim != 5 or cells.shape[-1] != 3 or cells.dtype != np.uint8:
                raise ValueError(expected("cells", "a uint8 array of shape (blocks, cells, H, W, 3)", cells.shape))
            self._hw = tuple(cells.shape[2:4])
        else:
            if cells.ndim != 5 or cells.shape[2] != 3:
                raise ValueError(expected("cells", "a tensor of shape (blocks, cells, 3, H, W)", cells))
            self._hw = tuple(cells.shape[-2:])
        self.cells = cells
        self.n, self.k = cells.shape[:2]
        self.headers = list(headers)
        self.groups = list(groups)
        self.captions = [list(c) for c in captions] if captions is not None else [[] for _ in range(self.n)]
        self.cell_captions = ([[list(c) for c in row] for row in cell_captions] if cell_captions is not None
                              else [[[] for _ in range(self.k)] for _ in range(self.n)])
        self.row_labels = [list(r) for r in row_labels] if row_labels is not None else None
        self.ncols = max(1, min(int(ncols), self.n)) if self.row_labels is None else 1
        self.dividers = sorted(set(int(d) for d in dividers if 0 < d < self.k))
        self.frames = frames
        self.upscale = max(1, int(upscale))
        self._cache: dict = {}

    # ------------------------------------------------------------------ geometry
    def _geometry(self, f: int) -> dict:
        key = (f, self.ncols, _HEAVY.get())
        if key not in self._cache:
            self._cache[key] = self._measure(f)
        return self._cache[key]

    def _measure(self, f: int) -> dict:
        h, w = (side * self.upscale for side in self._hw)
        fw = max(2, f // 6) if self.frames is not None else 0
        gap = max(3, f // 4) + 2 * fw
        cell_w, caption_w, label_w = self._text_widths(f)
        col = [max(w + 2 * fw, cell_w[j]) for j in range(self.k)]
        for j in range(min(self.k, len(self.headers))):
            col[j] = max(col[j], text_width(self.headers[j], f) + 4)
        div = f
        for start, stop, text in self.groups:  # widen the span's last column until its text fits
            span = sum(col[start:stop]) + gap * (stop - start - 1)
            col[stop - 1] += max(0, text_width(text, f) + f - span)
        inner = sum(col) + gap * (self.k - 1) + div * len(self.dividers)
        block = max(inner, caption_w)
        label = label_w + f if self.row_labels else 0
        caption_lines = max((len(c) for row in self.cell_captions for c in row), default=0)
        block_lines = max((len(c) for c in self.captions), default=0)
        block_h = 2 * fw + h + caption_lines * line_height(f - 1) + block_lines * line_height(f) + max(2, f // 4)
        header_h = (line_height(f) + 3 if self.groups else 0) + (line_height(f) + max(2, f // 5) if self.headers else 0)
        rows = -(-self.n // self.ncols)
        vgap = max(4, f // 2)
        hgap = 2 * f if self.k > 1 else max(4, f // 2)  # blocks of several cells need a clear gap (and a rule)
        return dict(h=h, w=w, fw=fw, gap=gap, col=col, div=div, inner=inner, block=block, label=label,
                    block_h=block_h, header_h=header_h, rows=rows, vgap=vgap, hgap=hgap,
                    width=label + self.ncols * block + (self.ncols - 1) * hgap,
                    height=header_h + rows * block_h + (rows - 1) * vgap)

    def _text_widths(self, f: int) -> Tuple[List[int], int, int]:
        """The widest caption line under each cell column (+ 4 px), under a block (+ 4 px), and of the row labels, at
        font size ``f`` (measured once per size and weight: the geometry is asked for at several column counts)."""
        key = ("text", f, _HEAVY.get())
        if key not in self._cache:
            lines = [set(line for row in self.cell_captions for line in row[j]) for j in range(self.k)]
            cell = [max((text_width(line, f - 1) + 4 for line in col), default=0) for col in lines]
            caption = max((text_width(line, f) + 4 for line in set(x for c in self.captions for x in c)), default=0)
            label = max((text_width(line, f) for r in self.row_labels for line in r), default=0) if self.row_labels \
                else 0
            self._cache[key] = (cell, caption, label)
        return self._cache[key]

    def min_width(self, f: int) -> int:
        return self._geometry(f)["width"]

    def height(self, f: int, width: int) -> int:
        return self._geometry(f)["height"]

    def narrower(self) -> bool:
        if self.ncols <= 1:
            return False
        self.ncols -= 1
        return True

    def _column_x(self, g: dict, block_x: int) -> List[int]:
        xs, cx = [], block_x + (g["block"] - g["inner"]) // 2
        for j in range(self.k):
            if j in self.dividers:
                cx += g["div"]
            xs.append(cx)
            cx += g["col"][j] + g["gap"]
        return xs

    # ------------------------------------------------------------------ drawing
    def draw(self, canvas: Canvas, x: int, y: int, width: int, f: int) -> None:
        g = self._geometry(f)
        lay = canvas.layout
        top = y
        pixels = self.cells if isinstance(self.cells, np.ndarray) else to_uint8(self.cells)  # (N, K, h, w, 3)
        if self.upscale > 1:  # nearest neighbour in one copy: each pixel broadcast to an upscale x upscale block
            n, k, h, w, c = pixels.shape
            u = self.upscale
            pixels = np.broadcast_to(pixels[:, :, :, None, :, None, :], (n, k, h, u, w, u, c)).reshape(
                n, k, h * u, w * u, c)
        caption_lines = max((len(c) for row in self.cell_captions for c in row), default=0)
        for c in range(self.ncols):  # the headers above every block column
            xs = self._column_x(g, x + g["label"] + c * (g["block"] + g["hgap"]))
            hy = y
            if self.groups:
                for start, stop, text in self.groups:
                    x0, x1 = xs[start], xs[stop - 1] + g["col"][stop - 1]
                    canvas.text(text, (x0 + x1) / 2, hy, "group", align="centre")
                    canvas.fill((x0, hy + line_height(f) + 1, x1, hy + line_height(f) + 2), GREY)
                hy += line_height(f) + 3
            for j, text in enumerate(self.headers[: self.k]):
                canvas.text(text, xs[j] + g["col"][j] / 2, hy, "header", align="centre")
        if g["header_h"]:
            lay.regions["header"] = (x, y, x + g["width"], y + g["header_h"])
        y += g["header_h"]
        for n in range(self.n):
            r, c = divmod(n, self.ncols)
            bx = x + g["label"] + c * (g["block"] + g["hgap"])
            by = y + r * (g["block_h"] + g["vgap"])
            xs = self._column_x(g, bx)
            cap_y = by + 2 * g["fw"] + g["h"]
            for j in range(self.k):
                px = xs[j] + (g["col"][j] - g["w"]) // 2
                box = canvas.paste(pixels[n, j], px, by + g["fw"])
                lay.cells[(n, j)] = box
                colour = self.frames[n][j] if self.frames is not None else None
                if colour is not None:
                    canvas.frame(box, colour, g["fw"])
                for i, line in enumerate(self.cell_captions[n][j]):
                    canvas.text(line, xs[j] + g["col"][j] / 2, cap_y + i * line_height(f - 1), "caption",
                                size=f - 1, align="centre")
            for j in self.dividers:
                dx = xs[j] - g["gap"] // 2 - g["div"] // 2
                canvas.fill((dx - 1, by, dx + 1, cap_y), GREY)
                if n == 0:
                    lay.regions[f"divider {j}"] = (dx - 1, by, dx + 1, cap_y)
            ly = cap_y + caption_lines * line_height(f - 1)
            for i, line in enumerate(self.captions[n]):
                canvas.text(line, bx + g["block"] / 2, ly + i * line_height(f), "caption", align="centre")
            if self.row_labels is not None:
                mid = by + g["fw"] + g["h"] / 2 - len(self.row_labels[n]) * line_height(f) / 2
                for i, line in enumerate(self.row_labels[n]):
                    canvas.text(line, x, mid + i * line_height(f), "row")
        bottom = y + g["rows"] * g["block_h"] + (g["rows"] - 1) * g["vgap"]
        for c in range(1, self.ncols if self.k > 1 else 1):  # a faint rule between block columns
            rx = x + g["label"] + c * (g["block"] + g["hgap"]) - g["hgap"] // 2
            canvas.fill((rx, top, rx + 1, bottom), (0.8, 0.8, 0.8))
        lay.regions["grid"] = (x, top, x + g["width"], y + g["rows"] * g["block_h"] + (g["rows"] - 1) * g["vgap"])
        lay.columns = self.ncols


class Matrix(Section):
    """Coloured cells with their values printed: ``values (R, C)`` through ``cmap`` over ``lo..hi``, row names left,
    column names above (NaN cells grey with a dash)."""

    def __init__(self, values: Tensor, row_names: Sequence[str], col_names: Sequence[str], cmap: str, lo: float,
                 hi: float, fmt: str = "{:.2f}", corner: str = "") -> None:
        if values.ndim != 2 or values.shape != (len(row_names), len(col_names)):
            raise ValueError(expected("values", f"a tensor of shape ({len(row_names)}, {len(col_names)})", values))
        self.values = values.detach().float().cpu()
        self.rows, self.cols = list(row_names), list(col_names)
        self.cmap, self.lo, self.hi, self.fmt, self.corner = cmap, float(lo), float(hi), fmt, corner
        self._cache: dict = {}

    def _text(self, v: float) -> str:
        return "–" if v != v else self.fmt.format(v)

    def _geometry(self, f: int) -> dict:
        key = (f, _HEAVY.get())
        if key not in self._cache:
            self._cache[key] = self._measure(f)
        return self._cache[key]

    def _measure(self, f: int) -> dict:
        widest = max([text_width(self._text(float(v)), f) for v in self.values.flatten()] + [text_width("00", f)])
        pad = max(4, f // 2)
        col = [max(widest, text_width(name, f)) + pad for name in self.cols]
        label = max([text_width(r, f) for r in self.rows] + [text_width(self.corner, f)]) + pad
        cell_h = line_height(f) + f // 2
        return dict(col=col, label=label, cell_h=cell_h, head=line_height(f) + 2,
                    width=label + sum(col), height=line_height(f) + 2 + cell_h * len(self.rows))

    def min_width(self, f: int) -> int:
        return self._geometry(f)["width"]

    def height(self, f: int, width: int) -> int:
        return self._geometry(f)["height"]

    def draw(self, canvas: Canvas, x: int, y: int, width: int, f: int) -> None:
        g = self._geometry(f)
        span = (self.hi - self.lo) or 1.0
        scaled = ((self.values - self.lo) / span).clamp(0, 1)
        colours = apply_colormap(torch.nan_to_num(scaled, nan=0.0)[None], self.cmap)[0]  # (3, R, C)
        if self.corner:
            canvas.text(self.corner, x, y, "corner", colour=GREY)
        xs = [x + g["label"] + sum(g["col"][:j]) for j in range(len(self.cols))]
        for j, name in enumerate(self.cols):
            canvas.text(name, xs[j] + g["col"][j] / 2, y, "header", align="centre")
        top = y + g["head"]
        for i, name in enumerate(self.rows):
            cy = top + i * g["cell_h"]
            canvas.text(name, x, cy + g["cell_h"] / 2, "row", valign="middle")
            for j in range(len(self.cols)):
                v = float(self.values[i, j])
                box = (xs[j] + 1, cy + 1, xs[j] + g["col"][j] - 1, cy + g["cell_h"] - 1)
                rgb = (0.9, 0.9, 0.9) if v != v else tuple(float(c) for c in colours[:, i, j])
                canvas.fill(box, rgb)
                canvas.layout.cells[(i, j)] = box
                light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.5
                canvas.text(self._text(v), (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, "value", align="centre",
                            valign="middle", colour=(0.0, 0.0, 0.0) if light else (1.0, 1.0, 1.0))
        canvas.layout.regions["matrix"] = (x, y, x + g["width"], top + len(self.rows) * g["cell_h"])
        canvas.layout.columns = len(self.cols)
