"""A line of several words is put together from its words' masks: the same pixels and widths as PIL's line."""
import numpy as np
import pytest
import torch

from lightning_xai.render import _canvas as canvas
from lightning_xai.render import attribution_figure


def _on_page(mask_and_offset):
    mask, x0, y0 = mask_and_offset
    page = np.zeros((80, 900), dtype=np.float32)
    page[20 + y0:20 + y0 + mask.shape[0], 20 + x0:20 + x0 + mask.shape[1]] = mask[:, :, 0]
    return page


CAPTIONS = ["conf 0.53 · expl. 3", "label 7 · pred 1", "#31 label 9", "saliency · epoch 12", "0.98 ≥3.15",
            "integrated_gradients over the epochs (10 of 12 explained epochs, evenly spread)"]


@pytest.mark.parametrize("size", list(range(10, 19)))
@pytest.mark.parametrize("bold", [pytest.param(False, id="regular"), pytest.param(True, id="bold")])
def test_composed_line_is_pils_line(size, bold):
    """Caption-like lines at every font size a figure uses: the composed mask, placed by its offset, is PIL's line
    pixel for pixel, and the width the layout records is PIL's advance rounded up."""
    for text in CAPTIONS:
        assert canvas._words(text, size, bold) is not None, text
        composed = _on_page(canvas._text_mask(text, size, bold))
        pil = _on_page(canvas._pil_mask(text, size, bold))
        assert np.array_equal(composed, pil), (text, size, bold, np.abs(composed - pil).max())
        assert canvas._text_width(text, size, bold) == int(np.ceil(canvas.font(size, bold).getlength(text)))


def test_one_word_and_kerned_spaces_go_to_pil():
    assert canvas._words("saliency", 14, False) is None
    assert canvas._words("", 14, False) is None


def test_new_captions_do_not_call_pil_per_line(monkeypatch):
    """Once its words are known, a new caption is composed without PIL rendering the line."""
    canvas._text_mask("conf 0.11 · expl. 4", 13, True)  # the words "conf", "·", "expl.", "4" and a number
    calls = []
    pil = canvas._pil_mask
    monkeypatch.setattr(canvas, "_pil_mask", lambda *a: calls.append(a[0]) or pil(*a))
    canvas._text_mask("conf 0.11 · expl. 5", 13, True)
    assert calls and all(c.lstrip("".join(canvas._BLANKS)) == "5" for c in calls)  # the new word, not the line


def test_attribution_figure_same_with_and_without_composition(monkeypatch):
    """The CIFAR-sized attribution figure with new captions: the same pixels and the same text boxes as when every
    line is rendered by PIL."""
    g = torch.Generator().manual_seed(0)
    x, maps = torch.rand(8, 3, 32, 32, generator=g), torch.rand(8, 32, 32, generator=g) * 3
    captions = [[f"label {i} · pred {(i * 3) % 10}", f"conf {0.1 + 0.0731 * i:.2f} · expl. {i}"] for i in range(8)]

    def draw():
        for cached in (canvas._text_mask, canvas._text_patch, canvas._text_width):
            cached.cache_clear()
        return attribution_figure(x, maps, False, title="saliency · epoch 3", captions=captions, scale=3.0)

    composed = draw()
    monkeypatch.setattr(canvas, "_words", lambda *a: None)
    pil = draw()
    assert composed.layout.texts == pil.layout.texts
    assert np.array_equal(composed.pixels, pil.pixels)
