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
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor


Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
RGB = Tuple[float, float, float]

CARD_WIDTH = 350  # px: TensorBoard's image card (tf-image-loader, `:host { width: 350px }`) scales images to this width
TEXT_AT_CARD = 10.0  # px: the text height aimed at when a figure is shown in that card
MIN_FONT, MAX_FONT = 11, 28
TEXT_BOUND_FONT = 16  # px: the font of a figure whose width only its text sets
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


# Text of a figure wider than the card is drawn bold: TensorBoard shrinks it with nearest-neighbour sampling
# (`image-rendering: pixelated`), which drops the one-pixel strokes of regular text but keeps bold ones.
_HEAVY: ContextVar[bool] = ContextVar("lightning_xai_heavy_text", default=False)


def text_width(text: str, size: int, bold: bool = False) -> int:
    """Width in px of one line of ``text`` (bold inside a figure wider than the card)."""
    return _text_width(text, size, bold or _HEAVY.get())


@lru_cache(maxsize=4096)
def _text_width(text: str, size: int, bold: bool) -> int:
    words = _words(text, size, bold)
    if words is not None:  # the words' advances, each measured once (a new caption is mostly known words)
        return -(-words[1] // 64)
    return int(np.ceil(font(size, bold).getlength(text)))


@lru_cache(maxsize=16384)
def _advance64(text: str, size: int, bold: bool) -> int:
    """The advance of ``text`` laid out by PIL, in 64ths of a pixel (FreeType's 26.6 units: exact)."""
    return int(round(font(size, bold).getlength(text) * 64))


@lru_cache(maxsize=2048)
def _space_neutral(char: str, size: int, bold: bool) -> bool:
    """Whether ``char`` is laid out next to a space, on either side, without kerning against it."""
    a, s = _advance64(char, size, bold), _advance64(" ", size, bold)
    return _advance64(char + " ", size, bold) == a + s and _advance64(" " + char, size, bold) == s + a


def _words(text: str, size: int, bold: bool) -> Optional[Tuple[List[Tuple[str, int]], int]]:
    """A line as its words and each word's pen position (64ths of a pixel), and the line's advance, when PIL lays
    the line out as its words side by side (no kerning across a space); None for one word or otherwise."""
    parts = text.split(" ")
    if len(parts) < 2 or not _space_neutral(" ", size, bold):
        return None
    space = _advance64(" ", size, bold)
    placed, pen = [], 0
    for i, word in enumerate(parts):
        if word:
            if not (_space_neutral(word[0], size, bold) and _space_neutral(word[-1], size, bold)):
                return None
            placed.append((word, pen))
            pen += _advance64(word, size, bold)
        if i < len(parts) - 1:
            pen += space
    return (placed, pen) if placed else None


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
    ``header``, ``grid``, ``divider <column>``, ``matrix``, ``legend``, ``colorbar``, ``bars``, ``notes``), the box
    of every cell
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
    """A rendered figure: ``pixels (H, W, 3)`` uint8 as drawn (what :func:`~lightning_xai._logging.log_image` encodes)
    and its :class:`Layout`; ``image`` is the same as a ``(3, H, W)`` float tensor in ``[0, 1]``."""

    pixels: np.ndarray
    layout: Layout

    @property
    def image(self) -> Tensor:
        """``(3, H, W)`` float32 in ``[0, 1]``: ``pixels / 255``, channels first (a new tensor at every access)."""
        return torch.from_numpy(np.multiply(self.pixels.transpose(2, 0, 1), np.float32(1 / 255), dtype=np.float32))


# --------------------------------------------------------------------------- the canvas
@lru_cache(maxsize=8192)
def _text_mask(text: str, size: int, bold: bool) -> Tuple[np.ndarray, int, int]:
    """One line of text as coverage ``(h, w, 1)`` in ``[0, 1]`` and its offset from the ascender-left anchor (cached:
    most labels come back at every epoch). A line of several words is put together from its words' masks
    (:func:`_word_mask`, the same pixels as PIL's line): a new caption (``conf 0.53 · expl. 3``) is mostly known
    words, and PIL took about 0.3 ms to render each new line."""
    words = _words(text, size, bold)
    if words is not None:
        return _composed_mask(words[0], size, bold)
    return _pil_mask(text, size, bold)


def _pil_mask(text: str, size: int, bold: bool) -> Tuple[np.ndarray, int, int]:
    """:func:`_text_mask` rendered by PIL."""
    from PIL import Image, ImageDraw

    fnt = font(size, bold)
    try:
        x0, y0, x1, y1 = fnt.getbbox(text, anchor="la")
        anchor: Optional[str] = "la"
    except (TypeError, ValueError):  # pragma: no cover - a bitmap font without anchors
        x0, y0, x1, y1 = fnt.getbbox(text)
        anchor = None
    w, h = max(1, x1 - x0), max(1, y1 - y0)
    image = Image.new("L", (w, h), 0)
    ImageDraw.Draw(image).text((-x0, -y0), text, font=fnt, fill=255, anchor=anchor)
    return np.asarray(image, dtype=np.float32)[:, :, None] / 255.0, x0, y0


_BLANKS = (" ", "\u2009", "\u200a", "\u2008", "\u2007", "\u2002")  # space, thin, hair, punctuation, figure, en


@lru_cache(maxsize=64)
def _phase_prefixes(size: int, bold: bool) -> Dict[int, str]:
    """For each phase (64ths of a pixel) a run of blank characters reaches, the shortest such run: their advances
    differ, so together they reach phases one of them alone cannot (a space of 224/64 px reaches two)."""
    blanks = [b for b in _BLANKS if not _pil_mask(b, size, bold)[0].any()]  # a font without the character: tofu
    best: Dict[int, str] = {0: ""}
    frontier = [""]
    while frontier and len(best) < 64 and len(frontier[0]) < 8:
        grown = []
        for run in frontier:
            for b in blanks:
                phase = _advance64(run + b, size, bold) % 64
                if phase not in best:
                    best[phase] = run + b
                    grown.append(run + b)
        frontier = grown
    return best


@lru_cache(maxsize=8192)
def _word_mask(word: str, size: int, bold: bool, phase: int) -> Tuple[np.ndarray, int, int]:
    """``word`` as PIL renders it with its pen at ``phase`` 64ths of a pixel past a pixel boundary (FreeType places
    each glyph at its fractional position, so a word's pixels depend on that phase): coverage ``(h, w, 1)`` and its
    offset from the pen's whole pixel. Rendered after blank characters that bring the pen to that phase (the nearest
    phase below or above that they reach, if none reaches it)."""
    prefixes = _phase_prefixes(size, bold)
    near = min(prefixes, key=lambda p: (abs(p - phase), p))
    run = prefixes[near]
    pen = _advance64(run, size, bold)
    if _advance64(run + word, size, bold) != pen + _advance64(word, size, bold):  # kerned against the blank
        run, pen = "", 0
    mask, x0, y0 = _pil_mask(run + word, size, bold)
    ink = np.flatnonzero(mask[:, :, 0].any(0))
    if ink.size:  # after the blanks: the ink starts further in
        mask = mask[:, ink[0]:ink[-1] + 1]
        x0 += int(ink[0])
    return mask, x0 - pen // 64, y0


def _composed_mask(words: Sequence[Tuple[str, int]], size: int, bold: bool) -> Tuple[np.ndarray, int, int]:
    """A line's coverage from its words' masks, each at its pen position (64ths of a pixel): PIL's line, up to the
    phases the space cannot reach (:func:`_word_mask`)."""
    parts = []
    for word, pen in words:
        m, dx, dy = _word_mask(word, size, bold, pen % 64)
        parts.append((m, pen // 64 + dx, dy))
    x0, y0 = min(p[1] for p in parts), min(p[2] for p in parts)
    x1 = max(p[1] + p[0].shape[1] for p in parts)
    y1 = max(p[2] + p[0].shape[0] for p in parts)
    line = np.zeros((y1 - y0, x1 - x0, 1), dtype=np.float32)
    for m, x, y in parts:
        region = line[y - y0:y - y0 + m.shape[0], x - x0:x - x0 + m.shape[1]]
        np.maximum(region, m, out=region)
    return line, x0, y0


@lru_cache(maxsize=8192)
def _text_patch(text: str, size: int, bold: bool, colour: RGB) -> Tuple[np.ndarray, np.ndarray, int, int]:
    """One line of text ready to blend in integers: ``256 - coverage`` ``(h, w, 1)`` and ``colour * coverage``
    ``(h, w, 3)`` (uint16, coverage in 256ths), and its offset (see :func:`_text_mask`)."""
    mask, dx, dy = _text_mask(text, size, bold)
    cover = np.rint(mask * 256).astype(np.uint16)
    ink = np.asarray([int(round(c * 255)) for c in colour], dtype=np.uint16)
    return 256 - cover, cover * ink, dx, dy


def to_uint8(images: Tensor) -> np.ndarray:
    """``(..., 3, h, w)`` in ``[0, 1]`` as a ``(..., h, w, 3)`` uint8 array, rounded to nearest (in numpy: see
    :mod:`lightning_xai.render._maps` on torch's parallel kernels)."""
    moved = np.moveaxis(images.detach().float().cpu().numpy(), -3, -1)
    return np.clip(moved * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)


def _rgb8(colour: RGB) -> np.ndarray:
    return np.asarray([int(round(c * 255)) for c in colour], dtype=np.uint8)


class Canvas:
    """A white RGB canvas ``(H, W, 3)`` of uint8 (numpy: many small writes, no thread pool, a quarter of float32's
    memory traffic), on which cells are pasted, boxes filled and text drawn (coverage masks from PIL, cached per
    string and size)."""

    def __init__(self, width: int, height: int, size: int) -> None:
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)
        self.size = size
        self.layout = Layout(width=width, height=height, font_size=size)

    def paste(self, image: Any, x: int, y: int) -> Box:
        """Put an image (``(h, w, 3)`` uint8 array, or a ``(3, h, w)`` tensor in ``[0, 1]``) with its top-left corner at
        ``(x, y)``; returns its box."""
        if isinstance(image, Tensor):
            image = to_uint8(image)
        h, w = image.shape[:2]
        self.pixels[y:y + h, x:x + w] = image
        return (x, y, x + w, y + h)

    def fill(self, box: Box, colour: RGB) -> None:
        x0, y0, x1, y1 = box
        self.pixels[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = _rgb8(colour)

    def frame(self, box: Box, colour: RGB, width: int) -> None:
        """An outline ``width`` px wide drawn just outside ``box``."""
        x0, y0, x1, y1 = box
        self.fill((x0 - width, y0 - width, x1 + width, y0), colour)
        self.fill((x0 - width, y1, x1 + width, y1 + width), colour)
        self.fill((x0 - width, y0, x0, y1), colour)
        self.fill((x1, y0, x1 + width, y1), colour)

    def text(self, text: str, x: float, y: float, role: str, size: Optional[int] = None, bold: bool = False,
             align: str = "left", valign: str = "top", colour: RGB = BLACK) -> TextBox:
        """Draw one line of text; ``align`` is where ``x`` is (left, centre, right), ``valign`` where ``y`` is
        (top, middle). Returns (and records) its line box."""
        size = size or self.size
        bold = bold or _HEAVY.get()
        w, lh = text_width(text, size, bold), line_height(size)
        x0 = int(round(x - {"left": 0, "centre": w / 2, "right": w}[align]))
        y0 = int(round(y - (lh / 2 if valign == "middle" else 0)))
        box = TextBox(text, (x0, y0, x0 + w, y0 + lh), role)
        self.layout.texts.append(box)
        keep, add, dx, dy = _text_patch(text, size, bold, tuple(colour))
        tx, ty = x0 + dx, y0 + int(round(size * 0.125)) + dy  # the line box has ~1/8 of the size above the ascender
        height, width = self.pixels.shape[:2]
        cx0, cy0 = max(0, tx), max(0, ty)
        cx1, cy1 = min(width, tx + keep.shape[1]), min(height, ty + keep.shape[0])
        if cx1 > cx0 and cy1 > cy0:
            rows, cols = slice(cy0 - ty, cy1 - ty), slice(cx0 - tx, cx1 - tx)
            region = self.pixels[cy0:cy1, cx0:cx1]
            region[:] = (region * keep[rows, cols] + add[rows, cols] + 128) >> 8  # uint16: (p (256 - a) + c a) / 256
        return box

    def finish(self) -> Figure:
        """The figure: the pixels and the layout."""
        return Figure(self.pixels, self.layout)


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
    narrower (a grid with several blocks per row) gives up a column, until there is one; if none can, the font
    is ``TEXT_BOUND_FONT`` (text shown shrunk by the card is as large at any font size then). A figure wider than
    the card has all its text drawn bold.
    """
    def width_at(f: int) -> int:
        return max(min_width, max(s.min_width(f) for s in sections) + 2 * _margin(f))

    def fit() -> int:
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
            if fits:
                return f
            if not any(s.narrower() for s in sections):
                return TEXT_BOUND_FONT

    token = _HEAVY.set(False)
    try:
        f = fit()
        if width_at(f) > CARD_WIDTH:  # the card will shrink it: bold text, measured again
            _HEAVY.set(True)
            f = fit()
        return _draw(sections, f, width_at(f))
    finally:
        _HEAVY.reset(token)


def _draw(sections: Sequence[Section], f: int, width: int) -> Figure:
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
