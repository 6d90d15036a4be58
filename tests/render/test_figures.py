"""The figures of lightning_xai.render: layout (columns, header band, colour bar), labels read back from the figure's
own layout, text sized for TensorBoard's image card, the fixed colour scale, the evolution figure's columns."""
import pytest
import torch

from lightning_xai.render import (CARD_WIDTH, CYAN, RED, apply_colormap, attribution_figure, auto_columns,
                                  evidence_figure, evolution_figure, grid_figure, matrix_figure, robust_max,
                                  share_maps, spread)


def _captions(n):
    return [[f"label {i % 10} · pred {(i + 1) % 10}", f"conf 0.{i:02d} · expl. {i % 10}"] for i in range(n)]


def _box(image, box):
    x0, y0, x1, y1 = box
    return image[:, y0:y1, x0:x1]


def _shown_text_px(layout):
    """The font size once TensorBoard's card scales the image to its width (images narrower than it are stretched)."""
    return layout.font_size * CARD_WIDTH / max(layout.width, CARD_WIDTH)


@pytest.mark.parametrize("n, side", [pytest.param(32, 8, id="32-digits"), pytest.param(20, 28, id="20-mnist"),
                                     pytest.param(8, 224, id="8-imagenet")])
def test_attribution_figure_layout_and_labels(n, side):
    x = torch.rand(n, 3 if side == 224 else 1, side, side)
    values = share_maps(torch.rand(n, 1, side, side), signed=False)
    fig = attribution_figure(x, values, False, title="saliency · epoch 3", subtitle="class explained: the label",
                             captions=_captions(n), scale=2.0)
    lay = fig.layout
    assert fig.image.shape == (3, lay.height, lay.width) and 0 <= float(fig.image.min()) <= float(fig.image.max()) <= 1
    # blocks input | heatmap | overlay wrap into columns; the header band is above every cell
    assert lay.columns >= 2 or side == 224
    assert lay.text("title") == ["saliency · epoch 3"] and lay.text("subtitle") == ["class explained: the label"]
    assert lay.text("header") == ["input", "heatmap", "overlay"] * lay.columns
    assert lay.regions["header"][3] <= min(b[1] for b in lay.cells.values())
    assert lay.cells.keys() == {(i, j) for i in range(n) for j in range(3)}
    for i in range(n):  # each block's three cells side by side, left to right
        boxes = [lay.cells[(i, j)] for j in range(3)]
        assert len({b[1] for b in boxes}) == 1 and boxes[0][2] <= boxes[1][0] and boxes[1][2] <= boxes[2][0]
    assert lay.text("caption") == [line for c in _captions(n) for line in c]  # every label, read back
    # the colour bar: its region holds the colour map's ramp from 0 to the scale
    assert lay.scale == ("inferno", 0.0, 2.0) and lay.text("tick") == ["0", "1", "≥2"]
    bar = _box(fig.image, lay.regions["colorbar"])
    ends = apply_colormap(torch.tensor([[[0.0, 1.0]]]), "inferno")[0, :, 0]  # (3, 2)
    assert torch.allclose(bar[:, bar.shape[1] // 2, 0], ends[:, 0], atol=1 / 255 + 1e-6)
    assert torch.allclose(bar[:, bar.shape[1] // 2, -1], ends[:, 1], atol=1 / 255 + 1e-6)
    # readable at TensorBoard's default size: text about 10 px once the 350 px card scales the figure
    assert _shown_text_px(lay) >= 9.5


def test_text_is_drawn_where_the_layout_says():
    fig = attribution_figure(torch.rand(6, 1, 8, 8), torch.rand(6, 8, 8), False, title="a title", captions=_captions(6),
                             scale=1.0)
    for text in fig.layout.texts:
        ink = _box(fig.image, text.box)
        assert ink.numel() and float(ink.min()) < 0.5, text  # dark pixels inside every recorded text box
    x0, y0, x1, y1 = fig.layout.cells[(0, 0)]
    assert float(fig.image[:, y0 - 2:y0, x0:x1].min()) > 0.99  # and nothing drawn between the header and a cell


def test_fixed_scale_same_map_same_colours_whatever_the_others():
    """On the fixed scale a map's colours depend on that map and the scale only (the other samples or the epoch do not
    move them); on the per-sample scale a weak map is stretched to full colour."""
    x = torch.rand(3, 1, 8, 8)
    weak = torch.ones(8, 8)
    weak[:2, :2] = 2.0
    strong = torch.ones(8, 8)
    strong[:2, :2] = 40.0
    a = share_maps(torch.stack([weak, strong, strong]), signed=False)
    b = share_maps(torch.stack([weak, weak, 10 * strong]), signed=False)  # other samples changed, sample 0 did not
    scale = robust_max(a)
    fa, fb = (attribution_figure(x, v, False, title="t", scale=scale) for v in (a, b))
    cell = fa.layout.cells[(0, 1)]
    assert cell == fb.layout.cells[(0, 1)] and torch.equal(_box(fa.image, cell), _box(fb.image, cell))
    weak_peak = float(_box(fa.image, fa.layout.cells[(0, 1)]).sum(0).max())
    strong_peak = float(_box(fa.image, fa.layout.cells[(1, 1)]).sum(0).max())
    assert weak_peak < strong_peak  # brightness compares across samples
    per = attribution_figure(x, a, False, title="t", scale=None)
    assert float(_box(per.image, per.layout.cells[(0, 1)]).sum(0).max()) == pytest.approx(strong_peak, abs=0.02)


def test_share_maps_unit_does_not_grow_with_the_gradients():
    maps = torch.rand(4, 3, 8, 8)
    assert torch.allclose(share_maps(maps, signed=False), share_maps(100 * maps, signed=False))
    assert torch.allclose(share_maps(torch.ones(1, 1, 8, 8), signed=False), torch.ones(1, 8, 8))  # even spread: 1
    assert torch.equal(share_maps(torch.zeros(2, 1, 4, 4), signed=True), torch.zeros(2, 4, 4))
    assert share_maps(torch.rand(2, 1, 4, 4), signed=False, size=(8, 8)).shape == (2, 8, 8)  # Grad-CAM sized up


def test_evolution_figure_grows_by_one_column_per_epoch():
    x = torch.rand(3, 1, 8, 8)
    figs = [evolution_figure(x, [(str(e), torch.rand(3, 8, 8)) for e in range(k)], False, title="t", scale=2.0,
                             row_labels=[[f"#{i}", "label 1"] for i in range(3)]) for k in range(1, 5)]
    for k, fig in enumerate(figs, start=1):
        assert fig.layout.text("header") == ["input"] + [str(e) for e in range(k)]
        assert fig.layout.text("group") == ["epoch"] and fig.layout.text("row")[:2] == ["#0", "label 1"]
        assert {j for _, j in fig.layout.cells} == set(range(k + 1))
    pitch = [figs[k].layout.cells[(0, k + 1)][0] - figs[k].layout.cells[(0, k)][0] for k in range(1, 4)]
    assert len(set(pitch)) == 1
    widths = [f.layout.regions["grid"][2] - f.layout.regions["grid"][0] for f in figs]
    assert widths[0] < widths[1] and widths[2:] == [widths[1] + pitch[0], widths[1] + 2 * pitch[0]]  # (one column
    # is narrower than the "epoch" header above it, so the first step is smaller)


def test_matrix_figure_prints_every_value():
    values = torch.tensor([[0.92, 0.92], [0.5, float("nan")]])
    fig = matrix_figure(values, ["input", "net.0"], ["untrained", "0"], title="probe accuracy · epoch 0",
                        label="held-out accuracy", corner="layer \\ epoch")
    lay = fig.layout
    assert lay.text("row") == ["input", "net.0"] and lay.text("header") == ["untrained", "0"]
    assert lay.text("value") == ["0.92", "0.92", "0.50", "–"] and lay.text("corner") == ["layer \\ epoch"]
    top = apply_colormap(torch.tensor([[[0.92]]]), "viridis")[0, :, 0, 0]
    x0, y0, x1, y1 = lay.cells[(0, 0)]
    assert torch.allclose(fig.image[:, y0 + 1, x0 + 1], top, atol=1 / 255 + 1e-6)  # the cell's colour is its value
    assert lay.scale == ("viridis", 0.0, 1.0) and "colorbar" in lay.regions


def test_evidence_figure_outlines_region_and_controls():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 4:6, 4:6] = True
    controls = torch.zeros(2, 3, 8, 8, dtype=torch.bool)
    controls[:, 0, 0:2, 0:2] = True
    x = torch.full((2, 1, 8, 8), 0.5)
    fig = evidence_figure(x, masks, controls, x.clone(), title="check", captions=[["pred 1 → 2"], ["pred 3 → 3"]],
                          bars=[("output shift (mean)", [("region", 0.4, RED), ("controls", 0.1, CYAN)])])
    lay = fig.layout
    assert lay.text("legend") == ["region", "control regions"] and lay.text("value") == ["0.400", "0.100"]
    assert "bars" in lay.regions
    cell = _box(fig.image, lay.cells[(0, 0)])
    h, w = cell.shape[-2:]
    colour = lambda rgb: (cell - torch.tensor(rgb).view(3, 1, 1)).abs().amax(0) < 0.01  # noqa: E731
    red, cyan = colour(RED), colour(CYAN)
    assert bool(red[h // 2:, w // 2:].any()) and not bool(red[: h // 4, : w // 4].any())  # around the region
    assert bool(cyan[: h // 2, : w // 2].any()) and not bool(cyan[h // 2 + 2:, w // 2 + 2:].any())  # and the control


def test_text_bound_grids_give_up_columns_to_stay_readable():
    cells = torch.rand(12, 3, 3, 16, 16)
    headers = ["a long header", "another long one", "a third"]
    fig = grid_figure(cells, title="t", headers=headers, ncols=6)
    assert fig.layout.columns < 6 and _shown_text_px(fig.layout) >= 9.5


def test_spread_and_columns():
    assert spread(range(5), 12) == [0, 1, 2, 3, 4]
    assert spread(range(30), 4) == [0, 10, 19, 29]  # first and latest kept
    assert [auto_columns(n) for n in (1, 4, 10, 32)] == [1, 1, 2, 4]


@pytest.mark.parametrize("n", [4, 32])
def test_colour_bar_frame_clears_its_label(n):
    """The bar's one-pixel frame sits below the label's last line box, which holds its descenders (it overlapped
    that box by a pixel, and descenders touched the frame)."""
    fig = attribution_figure(torch.rand(n, 1, 8, 8), torch.rand(n, 8, 8), False, title="t", captions=_captions(n),
                             scale=1.0)
    label_bottom = max(t.box[3] for t in fig.layout.texts if t.role == "colorbar")
    frame_top = fig.layout.regions["colorbar"][1] - 1
    assert frame_top > label_bottom
