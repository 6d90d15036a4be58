"""Charts with axes as image tensors: a scatter of 2-D projections coloured by class, horizontal bars.

Drawn with matplotlib's object API on an Agg canvas (no ``pyplot``, so no global figure state or
backend switch), imported on first use. Images are float tensors ``(3, H, W)`` in ``[0, 1]``, ready for
:func:`lightning_xai._logging.log_image`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lightning_xai._utils import expected


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
               series: Optional[Sequence[str]] = None) -> Tensor:
    """Horizontal bars, one row per name, as an image; ``values`` is ``(F,)`` or ``(S, F)`` for ``S`` series.

    The first row of ``names`` is drawn at the top.

    Example:
        >>> barh_image(torch.tensor([0.2, 0.8]), ["a", "b"]).shape[0]
        3
    """
    vals = values.detach().float().cpu()
    if vals.ndim == 1:
        vals = vals.unsqueeze(0)
    if vals.ndim != 2 or vals.shape[1] != len(names):
        raise ValueError(expected("values", f"a tensor of shape ({len(names)},) or (S, {len(names)})", values))
    s, f = vals.shape
    fig = _figure(5.5, max(2.0, 0.25 * f * max(1, min(s, 3)) + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / s
    colours = _class_colours(s)
    rows = torch.arange(f, dtype=torch.float32)
    for i in range(s):
        label = series[i] if series is not None else None
        ax.barh((rows - 0.4 + height * (i + 0.5)).numpy(),
                vals[i].numpy(), height=height, color=colours[i], label=label)
    ax.set_yticks(rows.numpy())
    ax.set_yticklabels(list(names), fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    if series is not None and s > 1:
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return figure_to_image(fig)


def _class_colours(k: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]
