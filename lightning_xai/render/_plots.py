"""Charts with axes as image tensors: a scatter of 2-D projections coloured by class, horizontal bars.

Drawn with matplotlib's object API on an Agg canvas (no ``pyplot``, so no global figure state or
backend switch), imported on first use. Images are float tensors ``(3, H, W)`` in ``[0, 1]``, ready for
:func:`lightning_xai._logging.log_image`.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._utils import expected
from lightning_xai.render._canvas import GREY, Figure, Layout, TextBox


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def figure_to_image(fig: Any) -> Tensor:
    """Render a matplotlib ``Figure`` on its Agg canvas into ``(3, H, W)`` in ``[0, 1]``."""
    fig.canvas.draw()
    rgba = torch.frombuffer(bytearray(fig.canvas.buffer_rgba()), dtype=torch.uint8)
    width, height = fig.canvas.get_width_height()
    return rgba.view(height, width, 4)[..., :3].permute(2, 0, 1).float() / 255.0  # (3, H, W)


def scatter_image(points: Tensor, labels: Optional[Tensor] = None, title: str = "", xlabel: str = "PC 1",
                  ylabel: str = "PC 2", class_names: Optional[Sequence[str]] = None) -> Tensor:
    """A scatter plot of ``points (N, 2)``, one colour per class of ``labels (N,)``, as an image.

    Example:
        >>> scatter_image(torch.randn(10, 2), torch.arange(10) % 2).shape[0]
        3
    """
    if points.ndim != 2 or points.shape[1] < 2:
        raise ValueError(expected("points", "a tensor of shape (N, 2)", points))
    pts = points.detach().float().cpu()
    fig = _figure(5.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    if labels is None:
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=16, color="tab:blue")
    else:
        labels = labels.detach().cpu().view(-1)
        classes = sorted(set(int(c) for c in labels.tolist()))
        cmap = _class_colours(len(classes))
        for i, c in enumerate(classes):
            sel = labels == c
            name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
            ax.scatter(pts[sel, 0].numpy(), pts[sel, 1].numpy(), s=16, color=cmap[i], label=name)
        if len(classes) <= 20:
            ax.legend(fontsize=6, markerscale=0.8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                      ncol=2 if len(classes) > 10 else 1)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=8)
    fig.subplots_adjust(left=0.13, right=0.8, bottom=0.12, top=0.9)  # fixed layout: tight_layout is slow
    return figure_to_image(fig)


def barh_image(values: Tensor, names: Sequence[str], title: str = "", xlabel: str = "",
               series: Optional[Sequence[str]] = None, *, subtitle: str = "", overall_first: bool = False,
               card: bool = False) -> Union[Tensor, Figure]:
    """Horizontal bars, one row per name, as an image; ``values`` is ``(F,)`` or ``(S, F)`` for ``S`` series.

    The first row of ``names`` is drawn at the top.

    Args:
        values: ``(F,)`` or ``(S, F)``.
        names: ``F`` row names.
        title, xlabel: the title and the x-axis label.
        series: ``S`` legend entries (a legend is drawn for ``S > 1``).
        subtitle: grey text under the title (``card`` only).
        overall_first: the first series is the overall one: drawn in dark grey and thicker, the others in
            distinct hues with no grey (``card`` only).
        card: sized for TensorBoard's image card (``BARH_CARD_WIDTH`` px wide, text about ``TEXT_AT_CARD`` px
            high once shown there, bars a fixed number of px thick (:func:`barh_group_px`), tight margins, the
            legend under the title) and returned as a :class:`~lightning_xai.render.Figure` whose layout records
            the texts (roles ``title``, ``subtitle``, ``legend``, ``row``, ``tick``, ``caption`` for the x-axis
            label), the regions ``title``, ``legend`` and ``bars`` (the axes) and each bar's box as cell
            ``(row, series)``. Without it: the first chart of this module (5.5 in wide, a quarter inch per row and
            series up to 3), as an image tensor.

    Example:
        >>> barh_image(torch.tensor([0.2, 0.8]), ["a", "b"]).shape[0]
        3
        >>> barh_image(torch.tensor([0.2, 0.8]), ["a", "b"], card=True).layout.text("row")
        ['a', 'b']
    """
    vals = values.detach().float().cpu()
    if vals.ndim == 1:
        vals = vals.unsqueeze(0)
    if vals.ndim != 2 or vals.shape[1] != len(names):
        raise ValueError(expected("values", f"a tensor of shape ({len(names)},) or (S, {len(names)})", values))
    if series is not None and len(series) != vals.shape[0]:
        raise ValueError(expected("series", f"{vals.shape[0]} names, one per row of `values`", list(series)))
    if card:
        return _barh_card(vals, list(names), title, xlabel, series, subtitle, overall_first)
    s, f = vals.shape
    fig = _figure(5.5, max(2.0, 0.25 * f * max(1, min(s, 3)) + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / s
    colours = _class_colours(s)
    rows = torch.arange(f, dtype=torch.float32)
    for i in range(s):
        label = str(series[i]).replace("$", r"\$") if series is not None else None  # not mathtext
        ax.barh((rows - 0.4 + height * (i + 0.5)).numpy(),
                vals[i].numpy(), height=height, color=colours[i], label=label)
    ax.set_yticks(rows.numpy())
    ax.set_yticklabels([n.replace("$", r"\$") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    if series is not None and s > 1:
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return figure_to_image(fig)


# The card chart (``barh_image(card=True)``), in px at 100 dpi. TensorBoard's card shows an image CARD_WIDTH (350) px
# wide: 400 px keeps 8 pt text (11 px) at about TEXT_AT_CARD (10) px there and leaves room for names.
BARH_CARD_WIDTH = 400
BARH_CARD_BARS_PX = 600  # the bars' height that :func:`barh_rows` fits: with the header, ~1.7 card widths in the card
BARH_CARD_NAMES = 0.4  # the widest share of the width the row names take (a 50-letter name keeps ~230 px of bars)
_ALONE_PX, _OVERALL_PX, _GAP_PX = 14, 8, 6  # a lone series' bar; the overall bar among others; between rows
_MARGIN_PX = 6
_ALL_GREY = (0.25, 0.25, 0.25)
# The series after the overall one: ten distinct hues with no grey (tab10 with its grey replaced by gold: a dark hue
# would pass for the overall grey), then the same hues lighter (tab20's light members), then again.
_HUES = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#ffd700", "#bcbd22",
         "#17becf"]
_LIGHT_HUES = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#ffec8b", "#dbdb8d",
               "#9edae5"]


def barh_group_px(series: int, overall_first: bool = False) -> Tuple[int, int, int]:
    """The card chart's bars in px: ``(first series' bar, each other series' bar, one row with its gap)``.

    One series: 14 px bars. Several: the overall one 8 px, the others 30 px shared, 3 to 6 px each.
    """
    if series <= 1:
        return _ALONE_PX, _ALONE_PX, _ALONE_PX + _GAP_PX
    other = max(3, min(6, 30 // (series - 1 if overall_first else series)))
    first = _OVERALL_PX if overall_first else other
    return first, other, first + other * (series - 1) + _GAP_PX


def barh_rows(series: int, overall_first: bool = False, bars_px: int = BARH_CARD_BARS_PX) -> int:
    """How many rows of ``series`` bars the card chart fits in ``bars_px`` px (at least 5)."""
    return max(5, bars_px // barh_group_px(series, overall_first)[2])


def _series_colours(s: int, overall_first: bool) -> list:
    if not overall_first:
        return _class_colours(s)
    hues = _HUES + _LIGHT_HUES
    return [_ALL_GREY] + [hues[i % len(hues)] for i in range(s - 1)]


def _barh_card(vals: Tensor, names: List[str], title: str, xlabel: str, series: Optional[Sequence[str]],
               subtitle: str, overall_first: bool) -> Figure:
    from matplotlib.font_manager import FontProperties

    s, f = vals.shape
    width, m = BARH_CARD_WIDTH, _MARGIN_PX
    fig = _figure(width / 100, 2.0)
    renderer = fig.canvas.get_renderer()
    pt = {"title": 9.5, "text": 8.0}

    def size(text: str, points: float, bold: bool = False) -> Tuple[float, float]:
        w, h, _ = renderer.get_text_width_height_descent(
            text or "x", FontProperties(size=points, weight="bold" if bold else "normal"), ismath=False)
        return w, h

    def lines(text: str, points: float, bold: bool = False) -> List[str]:
        out: List[str] = []
        for paragraph in text.split("\n") if text else []:
            line = ""
            for word in paragraph.split(" "):
                candidate = f"{line} {word}" if line else word
                if line and size(candidate, points, bold)[0] > width - 2 * m:
                    out.append(line)
                    line = word
                else:
                    line = candidate
            out.append(line)
        return out

    def fit(text: str, room: float) -> str:
        """``text``, or its start and end around an ellipsis, at most ``room`` px wide."""
        if size(text, pt["text"])[0] <= room:
            return text
        head, tail = text[: (len(text) + 1) // 2], text[(len(text) + 1) // 2:]
        while (head or tail) and size(head + "…" + tail, pt["text"])[0] > room:
            head, tail = (head[:-1], tail) if len(head) > len(tail) else (head, tail[1:])
        return head + "…" + tail

    lh = {k: size("Ag|", p)[1] * 1.3 for k, p in pt.items()}  # px per line
    title_lines, sub_lines = lines(title, pt["title"], True), lines(subtitle, pt["text"])
    legend = series is not None and s > 1
    first_px, other_px, group_px = barh_group_px(s, overall_first)
    # names take at most BARH_CARD_NAMES of the width (the rest is the bars'), shortened in the middle beyond it;
    # a '$' is shown as itself, not as the start of matplotlib's mathtext
    names = [fit(n, BARH_CARD_NAMES * width).replace("$", r"\$") for n in names]
    series = None if series is None else [str(n).replace("$", r"\$") for n in series]
    name_w = max(size(n, pt["text"])[0] for n in names)
    tick_px = 3.5 * 100 / 72  # matplotlib's default major tick length and pad (3.5 pt)
    left = m + name_w + 2 * tick_px
    right = m + size("0.00", pt["text"])[0] / 2
    header = len(title_lines) * lh["title"] + len(sub_lines) * lh["text"]
    footer = 2 * tick_px + lh["text"] + (4 * 100 / 72 + lh["text"] if xlabel else 0) + m

    # the legend: as many columns as fit the width
    handles = []
    if legend:
        from matplotlib.patches import Patch

        colours = _series_colours(s, overall_first)
        handles = [Patch(color=colours[i], label=series[i]) for i in range(s)]
    for ncol in range(len(handles), 0, -1):
        # matplotlib fills a legend column by column, the first columns one longer: this order reads row by row
        by_row = [handles[i] for c in range(ncol) for i in range(c, len(handles), ncol)]
        leg = fig.legend(handles=by_row, ncol=ncol, loc="upper left", fontsize=pt["text"], frameon=False,
                         handlelength=1.0, handletextpad=0.4, columnspacing=1.0, borderpad=0.0, borderaxespad=0.0)
        box = leg.get_window_extent(renderer)
        if box.width <= width - 2 * m or ncol == 1:
            break
        leg.remove()
    legend_px = box.height + 4 if legend else 0
    bars_px = f * group_px
    height = int(round(m + header + legend_px + 4 + bars_px + footer))
    fig.set_size_inches(width / 100, height / 100)

    y = m
    for line in title_lines:
        fig.text(m / width, 1 - y / height, line, fontsize=pt["title"], fontweight="bold", va="top", ha="left")
        y += lh["title"]
    for line in sub_lines:
        fig.text(m / width, 1 - y / height, line, fontsize=pt["text"], color=GREY, va="top", ha="left")
        y += lh["text"]
    if legend:
        leg.set_bbox_to_anchor((m / width, 1 - y / height), transform=fig.transFigure)
        y += legend_px
    top = y + 4
    ax = fig.add_axes((left / width, 1 - (top + bars_px) / height, (width - left - right) / width, bars_px / height))
    colours = _series_colours(s, overall_first)
    bars = []
    for i in range(s):
        offset = _GAP_PX / 2 + (0 if i == 0 else first_px + other_px * (i - 1))
        thick = first_px if i == 0 else other_px
        starts = torch.arange(f, dtype=torch.float32) * group_px + offset
        bars.append(ax.barh((starts + thick / 2).numpy(), vals[i].numpy(), height=thick, color=colours[i],
                            label=series[i] if series is not None else None))
    ax.set_ylim(bars_px, 0)  # y in px from the top: row r's group spans [r * group_px, (r + 1) * group_px)
    ax.set_yticks([(r + 0.5) * group_px for r in range(f)])
    ax.set_yticklabels(names, fontsize=pt["text"])
    hi = float(torch.nan_to_num(vals, nan=0.0).max()) if vals.numel() else 0.0
    ax.set_xlim(0, hi * 1.04 if hi > 0 else 1.0)
    ax.tick_params(axis="x", labelsize=pt["text"])
    ax.set_xlabel(xlabel, fontsize=pt["text"])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.canvas.draw()

    layout = Layout(width=width, height=height, font_size=int(round(pt["text"] * 100 / 72)))

    def box_of(artist: Any) -> Tuple[int, int, int, int]:
        b = artist.get_window_extent(renderer)
        return (int(round(b.x0)), int(round(height - b.y1)), int(round(b.x1)), int(round(height - b.y0)))

    for t in fig.texts:
        layout.texts.append(TextBox(t.get_text(), box_of(t), "title" if t.get_fontweight() == "bold" else "subtitle"))
    if fig.texts:
        boxes = [box_of(t) for t in fig.texts]
        layout.regions["title"] = (m, min(b[1] for b in boxes), width - m, max(b[3] for b in boxes))
    if legend:
        entries = [TextBox(t.get_text().replace(r"\$", "$"), box_of(t), "legend") for t in leg.get_texts()]
        layout.texts += sorted(entries, key=lambda t: (t.box[1], t.box[0]))  # as read: row by row
        layout.regions["legend"] = box_of(leg)
    layout.texts += [TextBox(t.get_text().replace(r"\$", "$"), box_of(t), "row") for t in ax.get_yticklabels()]
    layout.texts += [TextBox(t.get_text(), box_of(t), "tick") for t in ax.get_xticklabels()
                     if t.get_visible() and t.get_text()]
    if xlabel:
        layout.texts.append(TextBox(xlabel, box_of(ax.xaxis.label), "caption"))
    layout.regions["bars"] = box_of(ax)
    for i, container in enumerate(bars):
        for r, patch in enumerate(container.patches):
            layout.cells[(r, i)] = box_of(patch)
    image = figure_to_image(fig)
    pixels = (image.permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()  # (H, W, 3)
    return Figure(pixels, layout)


def _class_colours(k: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]
