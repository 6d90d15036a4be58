"""Figures with text: a canvas of torch pixels plus text drawn with PIL, laid out as stacked sections.

A figure is a list of sections (title, grid of cells, matrix, legend, colour bar, bars, notes) stacked
top to bottom. :func:`compose` sizes the text from the figure's width, so text stays about
``TEXT_AT_CARD`` px high when TensorBoard shows the image in its ``CARD_WIDTH`` px card, and returns a
:class:`Figure`: the image and a :class:`Layout` recording every text and region, so tests (and users)
can read a figure's labels back without OCR.

Pixels are composed in torch; text is drawn in one pass with PIL's ``ImageDraw`` and DejaVu Sans (the
font matplotlib ships), so there is no figure library to start per call.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from lightning_xai.render._maps import apply_colormap

Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
RGB = Tuple[float, float, float]

CARD_WIDTH = 350  # px: TensorBoard's image card (tf-image-loader, `:host { width: 350px }`) scales images to this width
TEXT_AT_CARD = 10.0  # px: the text height aimed at when a figure is shown in that card
MIN_FONT, MAX_FONT = 11, 28
MIN_WIDTH = CARD_WIDTH  # px: narrower figures would only be stretched by the card
BLACK: RGB = (0.0, 0.0, 0.0)
GREY: RGB = (0.35, 0.35, 0.35)


# --------------------------------------------------------------------------- fonts and text
def font_size(width: int) -> int:
    """The font size (px) of a figure ``width`` px wide: ``TEXT_AT_CARD`` px once scaled into a TensorBoard card."""
    return int(min(MAX_FONT, max(MIN_FONT, round(TEXT_AT_CARD * width / CARD_WIDTH))))


def _font_path(bold: bool) -> Optional[str]:
    spec = importlib.util.find_spec("matplotlib")  # its bundled DejaVu Sans, without importing matplotlib
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "fonts", "ttf",
                        "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return path if os.path.exists(path) else None


@lru_cache(maxsize=64)
def font(size: int, bold: bool = False) -> Any:
    """A PIL font of ``size`` px: DejaVu Sans from matplotlib, else Pillow's bundled default font."""
    from PIL import ImageFont

    path = _font_path(bold)
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:  # pragma: no cover - a Pillow without FreeType
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


@lru_cache(maxsize=4096)
def text_width(text: str, size: int, bold: bool = False) -> int:
    """Width in px of one line of ``text``."""
    return int(np.ceil(font(size, bold).getlength(text)))


def line_height(size: int) -> int:
    return int(round(size * 1.25))


def wrap(text: str, width: int, size: int, bold: bool = False) -> List[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` px wide (a longer word gets a line of its own)."""
    lines: List[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and text_width(candidate, size, bold) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- the record of a figure
@dataclass(frozen=True)
class TextBox:
    """One line of text in a figure: what it says, where (``(x0, y0, x1, y1)`` px) and its role
    (``title``, ``subtitle``, ``header``, ``group``, ``corner``, ``caption``, ``row``, ``value``, ``legend``,
    ``tick``, ``colorbar``, ``bar``, ``note``)."""

    text: str
    box: Box
    role: str


@dataclass
class Layout:
    """What a figure shows and where: its size, font size, every line of text, named regions (``title``,
    ``header``, ``grid``, ``divider <column>``, ``matrix``, ``legend``, ``colorbar``, ``bars``, ``notes``), the box of every cell
    (``(block, column)`` in a grid, ``(row, column)`` in a matrix), the number of blocks per grid row
    (``columns``), and the colour bar's scale ``(cmap, lo, hi)``."""

    width: int = 0
    height: int = 0
    font_size: int = 0
    texts: List[TextBox] = field(default_factory=list)
    regions: Dict[str, Box] = field(default_factory=dict)
    cells: Dict[Tuple[int, int], Box] = field(default_factory=dict)
    columns: int = 0
    scale: Optional[Tuple[str, float, float]] = None

    def text(self, role: Optional[str] = None) -> List[str]:
        """The texts of one role (all texts with ``None``), top to bottom as drawn."""
        return [t.text for t in self.texts if role is None or t.role == role]


class Figure(NamedTuple):
    """A rendered figure: ``image (3, H, W)`` in ``[0, 1]`` and its :class:`Layout`."""

    image: Tensor
    layout: Layout


# --------------------------------------------------------------------------- the canvas
class Canvas:
    """A white RGB canvas: pixels pasted and filled in torch, text queued and drawn by PIL in :meth:`finish`."""

    def __init__(self, width: int, height: int, size: int) -> None:
        self.pixels = torch.ones(3, height, width)
        self.size = size
        self.layout = Layout(width=width, height=height, font_size=size)
        self._queue: List[Tuple[str, Tuple[int, int], str, int, bool, RGB]] = []

    def paste(self, image: Tensor, x: int, y: int) -> Box:
        """Put ``image (3, h, w)`` with its top-left corner at ``(x, y)``; returns its box."""
        h, w = image.shape[-2:]
        self.pixels[:, y:y + h, x:x + w] = image
        return (x, y, x + w, y + h)

    def fill(self, box: Box, colour: RGB) -> None:
        x0, y0, x1, y1 = box
        self.pixels[:, y0:y1, x0:x1] = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1)

    def frame(self, box: Box, colour: RGB, width: int) -> None:
        """An outline ``width`` px wide drawn just outside ``box``."""
        x0, y0, x1, y1 = box
        self.fill((x0 - width, y0 - width, x1 + width, y0), colour)
        self.fill((x0 - width, y1, x1 + width, y1 + width), colour)
        self.fill((x0 - width, y0, x0, y1), colour)
        self.fill((x1, y0, x1 + width, y1), colour)

    def text(self, text: str, x: float, y: float, role: str, size: Optional[int] = None, bold: bool = False,
             align: str = "left", valign: str = "top", colour: RGB = BLACK) -> TextBox:
        """Queue one line of text; ``align`` is where ``x`` is (left, centre, right), ``valign`` where ``y`` is
        (top, middle). Returns (and records) its box."""
        size = size or self.size
        w, lh = text_width(text, size, bold), line_height(size)
        x0 = int(round(x - {"left": 0, "centre": w / 2, "right": w}[align]))
        y0 = int(round(y - (lh / 2 if valign == "middle" else 0)))
        box = TextBox(text, (x0, y0, x0 + w, y0 + lh), role)
        self.layout.texts.append(box)
        # PIL anchors at the ascender ("la"); the line box adds ~1/8 of the size above it
        self._queue.append((text, (x0, y0 + int(round(size * 0.125))), "la", size, bold, colour))
        return box

    def finish(self) -> Figure:
        """Draw the queued text and return the figure."""
        from PIL import Image, ImageDraw

        hwc = torch.empty(self.pixels.shape[1], self.pixels.shape[2], 3, dtype=torch.uint8)
        hwc.copy_(self.pixels.permute(1, 2, 0).mul(255).add_(0.5).clamp_(0, 255))
        image = Image.fromarray(hwc.numpy())
        draw = ImageDraw.Draw(image)
        for text, xy, anchor, size, bold, colour in self._queue:
            fill = tuple(int(round(c * 255)) for c in colour)
            draw.text(xy, text, font=font(size, bold), fill=fill, anchor=anchor)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255.0)
        return Figure(pixels, self.layout)


# --------------------------------------------------------------------------- sections
class Section:
    """A horizontal band of a figure. ``min_width(f)``: the width it needs at font size ``f``;
    ``height(f, width)``: its height when given ``width``; ``draw``: paint it at ``(x, y)``."""

    def min_width(self, f: int) -> int:
        return 0

    def narrower(self) -> bool:
        """Take a narrower arrangement (fewer blocks per row) if there is one; False if not."""
        return False

    def height(self, f: int, width: int) -> int:
        raise NotImplementedError

    def draw(self, canvas: Canvas, x: int, y: int, width: int, f: int) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------- composition
def compose(sections: Sequence[Section], min_width: int = MIN_WIDTH) -> Figure:
    """Stack ``sections`` top to bottom into one figure.

    The font size follows the figure's width (:func:`font_size`) and the width what the sections need at that
    font size, iterated to a fixed point. Where there is none below ``MAX_FONT`` (text drives the width: it grows
    as fast as the font, so no font size stays readable once the card shrinks the figure), a section that can be
    narrower (a grid with several blocks per row) gives up a column, until there is one.
    """
    def width_at(f: int) -> int:
        return max(min_width, max(s.min_width(f) for s in sections) + 2 * _margin(f))

    while True:
        f, fits = MIN_FONT, False
        for _ in range(12):
            wanted = TEXT_AT_CARD * width_at(f) / CARD_WIDTH
            if round(wanted) <= f:
                fits = True
                break
            if f == MAX_FONT:
                break
            f = min(MAX_FONT, int(round(wanted)))
        if fits or not any(s.narrower() for s in sections):
            break
    width = width_at(f)
    inner = width - 2 * _margin(f)
    heights = [s.height(f, inner) for s in sections]
    gap = max(4, f // 2)
    height = 2 * _margin(f) + sum(heights) + gap * (len(sections) - 1)
    canvas = Canvas(width, height, f)
    y = _margin(f)
    for section, h in zip(sections, heights):
        section.draw(canvas, _margin(f), y, inner, f)
        y += h + gap
    return canvas.finish()


def _margin(f: int) -> int:
    return max(6, int(round(0.7 * f)))
