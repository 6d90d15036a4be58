"""TabularAttributionMonitor: the planted decisive feature gets the largest bar; events, hygiene, do-no-harm."""
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from helpers import DigitsModule, FigureSpy, assert_unchanged, read_events, snapshot, tiny_trainer
from lightning_xai.callbacks._tabular import TabularAttributionMonitor, feature_importance
from lightning_xai.render import Figure, barh_image

FEATURES = ["age", "height", "decisive", "noise/a", "noise b", "weight"]


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(FEATURES), generator=gen)
    y = (x[:, 2] + 0.1 * x[:, 0] > 0).long()  # feature 2 decides, feature 0 nudges
    return TensorDataset(x, y)


def _fit(tmp_path, callbacks, epochs=3):
    pl.seed_everything(0, workers=True)
    net = nn.Sequential(nn.Linear(len(FEATURES), 16), nn.ReLU(), nn.Linear(16, 2))
    module = DigitsModule(net=net, lr=0.05)
    train = DataLoader(_data(256, 0), batch_size=32, shuffle=True)
    val = DataLoader(_data(64, 1), batch_size=32)
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=epochs)
    trainer.fit(module, train, val)
    return module


def test_feature_importance():
    overall, per_class, values = feature_importance(torch.tensor([[1.0, -2.0], [3.0, float("nan")], [-1.0, 1.0]]),
                                                    torch.tensor([1, 0, 1]))
    assert overall.tolist() == pytest.approx([5 / 3, 1.0]) and values == [0, 1]
    assert per_class.tolist() == [[3.0, 0.0], [1.0, 1.5]]
    assert feature_importance(torch.ones(2, 3))[1] is None


def test_decisive_feature_gets_the_largest_bar_and_events_are_written(tmp_path):
    monitor = TabularAttributionMonitor(FEATURES, method=("integrated_gradients", {"steps": 16}), probe_samples=32)
    _fit(tmp_path, [monitor])
    acc = read_events(os.path.join(str(tmp_path), "tb", "version_0"))
    images = acc.Images("xai/tabular/integrated_gradients")
    assert len(images) == 3 and images[-1].height > 100
    last = {f: acc.Scalars(f"xai/tabular/integrated_gradients/{f.replace('/', '_')}")[-1].value for f in FEATURES}
    assert max(last, key=last.get) == "decisive", last
    assert last["decisive"] > 3 * max(v for k, v in last.items() if k not in ("decisive", "age"))


def test_monitor_does_no_harm_and_compute_is_clean(tmp_path):
    plain = _fit(tmp_path / "a", [], epochs=2)
    watched = _fit(tmp_path / "b", [TabularAttributionMonitor(FEATURES, method="saliency", probe_samples=16)], epochs=2)
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), k

    cb = TabularAttributionMonitor(FEATURES)
    watched.train()
    watched.net[0].weight.grad = torch.ones_like(watched.net[0].weight)
    x = torch.randn(5, len(FEATURES))
    before = snapshot(watched)
    with cb.explain_context(watched):
        out = cb.compute(watched, x, None)
    assert out["attr"].shape == (5, len(FEATURES))
    assert_unchanged(before, watched)


def test_bad_config():
    with pytest.raises(MisconfigurationException, match="feature_names"):
        TabularAttributionMonitor("age")
    with pytest.raises(MisconfigurationException, match="distinct"):
        TabularAttributionMonitor(["a", "a"])
    with pytest.raises(MisconfigurationException, match="grad_cam|Grad-CAM"):
        TabularAttributionMonitor(["a"], method="grad_cam")
    with pytest.raises(MisconfigurationException, match=r"\(N, 2\)"):
        TabularAttributionMonitor(["a", "b"]).check_rows(torch.randn(4, 3))


# --------------------------------------------------------------------------- the bar chart
DIGIT_PIXELS = [f"pixel_r{i // 8}_c{i % 8}" for i in range(64)]


def _chart(monitor, classes=10, rows=100, labelled=True):
    """The monitor's chart of 64 features over ``rows`` rows in ``classes`` classes (seeded), without a Trainer."""
    gen = torch.Generator().manual_seed(0)
    attr = torch.rand(rows, len(monitor.feature_names), generator=gen)
    overall, per_class, values = feature_importance(attr, torch.arange(rows) % classes if monitor.per_class else None)
    return monitor._chart(overall, per_class, values, labelled, rows, 4)


def _colour(fig, cell):
    x0, y0, x1, y1 = fig.layout.cells[cell]
    return fig.pixels[(y0 + y1) // 2, x0 + 1].astype(int)


def test_chart_says_how_many_features_it_shows_and_what_its_bars_are():
    fig = _chart(TabularAttributionMonitor(DIGIT_PIXELS))
    assert isinstance(fig, Figure)
    title, subtitle = " ".join(fig.layout.text("title")), " ".join(fig.layout.text("subtitle"))
    assert title == "integrated_gradients, epoch 4: top 13 of 64 features by mean |attribution|"
    assert "each class by label" in subtitle and "each row's label" in subtitle
    assert fig.layout.text("legend") == ["all"] + [f"class {c}" for c in range(10)]
    assert fig.layout.text("caption") == ["mean |attribution|"]
    assert len(fig.layout.text("row")) == 13

    few = _chart(TabularAttributionMonitor(DIGIT_PIXELS[:6]), classes=2)
    assert " ".join(few.layout.text("title")).endswith("mean |attribution| of all 6 features")

    plain = _chart(TabularAttributionMonitor(DIGIT_PIXELS, per_class=False, target="prediction", max_features=5),
                   labelled=False)
    assert " ".join(plain.layout.text("title")).endswith("top 5 of 64 features by mean |attribution|")
    subtitle = " ".join(plain.layout.text("subtitle"))
    assert "predicted class" in subtitle and "class by" not in subtitle and "colours" not in subtitle
    assert plain.layout.text("legend") == [] and plain.layout.text("caption") == ["mean |attribution|"]

    unlabelled = _chart(TabularAttributionMonitor(DIGIT_PIXELS), labelled=False)  # target="label" falls back
    assert "each row's predicted class (no labels)" in " ".join(unlabelled.layout.text("subtitle"))
    assert "each class by prediction" in " ".join(unlabelled.layout.text("subtitle"))


def test_chart_says_when_there_are_too_many_classes_for_per_class_bars():
    monitor = TabularAttributionMonitor(DIGIT_PIXELS, max_classes=3)
    with pytest.warns(RuntimeWarning, match="10 classes, more than max_classes=3"):
        fig = _chart(monitor)
    assert "10 classes > max_classes=3, so no per-class bars" in " ".join(fig.layout.text("subtitle"))
    assert fig.layout.text("legend") == [] and {s for _, s in fig.layout.cells} == {0}
    assert len(fig.layout.text("row")) == 30  # one bar per row: the rows of a chart without per-class bars


def test_chart_tells_all_from_the_classes_by_colour():
    fig = _chart(TabularAttributionMonitor(DIGIT_PIXELS))
    grey = _colour(fig, (0, 0))
    assert grey.max() - grey.min() <= 4 and grey.max() < 100  # "all": a neutral dark grey
    hues = [_colour(fig, (0, c)) for c in range(1, 11)]
    for i, a in enumerate(hues):
        assert a.max() - a.min() > 60, f"class {i - 1} is greyish: {a}"  # a colour, told apart from the grey
        for j in range(i):
            assert abs(a - hues[j]).sum() > 60, f"classes {j} and {i} look alike: {a}, {hues[j]}"


@pytest.mark.parametrize("per_class", [pytest.param(True, id="10-classes"), pytest.param(False, id="overall-only")])
def test_chart_fits_a_card_with_tight_margins(per_class):
    fig = _chart(TabularAttributionMonitor(DIGIT_PIXELS, per_class=per_class))
    layout = fig.layout
    assert fig.pixels.shape == (layout.height, layout.width, 3)
    assert layout.width == 400 and layout.height <= 760  # in TensorBoard's 350 px card: at most 665 px tall
    bars = list(layout.cells.values())
    top, bottom = min(b[1] for b in bars), max(b[3] for b in bars)
    region = layout.regions["bars"]
    assert top - region[1] <= 4 and region[3] - bottom <= 4  # no empty row above or below the bars
    assert layout.regions["title"][1] <= 8 and layout.height - region[3] <= 50  # title at the top, axis below
    thick = {s: b[3] - b[1] for (r, s), b in layout.cells.items() if r == 0}
    assert thick[0] >= 8 and all(t >= 3 for t in thick.values())


def test_chart_takes_the_features_asked_for():
    fig = _chart(TabularAttributionMonitor(DIGIT_PIXELS, max_features=40, per_class=False))
    assert len(fig.layout.text("row")) == 40 and fig.layout.height > 760  # asked for: taller than a card


def test_chart_in_a_fit_names_the_label_classes(tmp_path, monkeypatch):
    import lightning_xai.callbacks._tabular as module

    drawn = FigureSpy(monkeypatch, module, "barh_image")["barh_image"]
    _fit(tmp_path, [TabularAttributionMonitor(FEATURES, method="saliency", probe_samples=16)], epochs=1)
    (fig,) = drawn
    assert " ".join(fig.layout.text("title")) == "saliency, epoch 0: mean |attribution| of all 6 features"
    assert fig.layout.text("legend") == ["all", "class 0", "class 1"]
    assert "Bars: all 16 probe rows (grey), the rows of each class by label" in " ".join(fig.layout.text("subtitle"))


def test_barh_image_default_is_unchanged():
    image = barh_image(torch.rand(8), [f"feature {i}" for i in range(8)], title="t")
    assert isinstance(image, torch.Tensor) and image.shape == (3, 300, 550)


def test_card_chart_keeps_room_for_bars_with_long_names_and_shows_dollars_as_such():
    long = "onehotencoder__native-country_Outlying-US(Guam-USVI-etc)"
    names = [long, "W" * 60, "a$_b_c$", "age"]  # '$_b_c$' is a double subscript to matplotlib's mathtext
    fig = barh_image(torch.rand(2, 4), names, title="t", xlabel="mean |attribution|", series=["all", "class $0$"],
                     card=True, overall_first=True)
    x0, _, x1, _ = fig.layout.regions["bars"]
    assert x1 - x0 >= 0.5 * fig.layout.width  # the names take at most 40 % of the width
    rows = fig.layout.text("row")
    assert rows[2:] == ["a$_b_c$", "age"] and fig.layout.text("legend") == ["all", "class $0$"]
    assert rows[0].startswith("onehotencode") and rows[0].endswith("-etc)") and "…" in rows[0]
    assert "…" in rows[1] and len(rows[1]) < 60


def test_the_plain_chart_draws_names_with_dollars_too():
    image = barh_image(torch.rand(2, 3), ["a$_b_c$", "x", "y"], series=["s$_1_2$", "t"])  # mathtext would fail
    assert image.ndim == 3 and image.shape[0] == 3
