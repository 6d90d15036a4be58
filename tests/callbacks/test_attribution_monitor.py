"""Integration tests of AttributionMonitor in a real Trainer, reading the logged event files back."""
import glob
import os
import socket
import subprocess
import sys
import time
import urllib.request
import json
import warnings

import pytest
import torch
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from helpers import (DigitsModule, FigureSpy, digits_loaders, hook_count, png_equals, read_events, read_text, small_cnn,
                     tiny_trainer, trained_weights)
from lightning_xai.callbacks._attribution import AttributionMonitor, top_share

FAST = ("saliency", ("integrated_gradients", {"steps": 8}))


def _fit(tmp_path, callbacks, epochs=2, logger=True, **kw):
    pl.seed_everything(0, workers=True)
    model = DigitsModule(small_cnn(dropout=0.2))
    train, val = digits_loaders()
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=epochs, logger=logger, **kw)
    trainer.fit(model, train, val)
    return trainer, model


def _spy(monkeypatch):
    import lightning_xai.callbacks._attribution as module

    return FigureSpy(monkeypatch, module, "attribution_figure", "evolution_figure")


def test_logs_images_text_and_scalars(tmp_path, monkeypatch):
    figures = _spy(monkeypatch)
    monitor = AttributionMonitor(methods=FAST, probe_samples=10)
    trainer, model = _fit(tmp_path, [monitor])
    acc = read_events(trainer.logger.log_dir)
    tags = acc.Tags()
    assert {"xai/attribution/saliency", "xai/attribution/integrated_gradients", "xai/attribution/saliency/evolution",
            "xai/attribution/integrated_gradients/evolution"} <= set(tags["images"])
    events = acc.Images("xai/attribution/saliency")
    assert len(events) == 2  # one per epoch
    fig = figures["attribution_figure"][-2]  # saliency, then integrated_gradients, at the last epoch
    assert png_equals(events[-1].encoded_image_string, fig.image)  # what was drawn is what was logged
    layout = fig.layout
    assert layout.text("title") == ["saliency · epoch 1"]
    assert layout.columns >= 2  # blocks wrap into columns, not a strip
    assert layout.text("header")[:3] == ["input", "heatmap", "overlay"]
    labels = monitor.probe_y.tolist()
    captions = layout.text("caption")
    assert [c.split(" · ")[0] for c in captions[::2]] == [f"label {v}" for v in labels]  # one block per probe sample
    assert all(c.startswith("conf ") and " · expl. " in c for c in captions[1::2])
    assert "colorbar" in layout.regions and layout.scale[0] == "inferno"
    assert layout.scale[2] == monitor.scales["saliency"][0]
    assert layout.regions["header"][3] <= min(box[1] for box in layout.cells.values())  # headers above the cells
    share = [s.value for s in acc.Scalars("xai/attribution/saliency/top5_share")]
    assert len(share) == 2 and all(0.05 <= v <= 1.0 for v in share)
    gap = acc.Scalars("xai/attribution/integrated_gradients/completeness_gap")[-1].value
    assert 0 <= gap < 0.5
    text = read_text(acc, "xai/attribution/probes")
    assert "prediction" in text and "confidence" in text and "explained class: label" in text
    # probe set: stratified, one sample per class, grouped by class
    assert monitor.probe_y.tolist() == list(range(10))
    assert hook_count(model) == 0
    assert "xai/attribution/saliency/top5_share" in trainer.callback_metrics


def _planted_maps():
    """An attribution method (unsigned) whose map of probe sample 0 never changes while the others' peaks grow ten-fold
    each call (one call per explained epoch), and a scale re-estimated over the probe set at each epoch would move."""
    calls = []

    def planted(model, inputs, target):
        n = inputs.shape[0]
        maps = torch.ones(n, 1, 8, 8)
        maps[0, 0, :4, :4] = 3.0  # sample 0: the same map every epoch
        maps[1:, 0, 6:, 6:] = 10.0 ** (len(calls) + 1)  # the others: more and more concentrated
        calls.append(1)
        return maps

    planted.signed = False
    return planted


def test_fixed_scale_same_map_same_colours_at_two_epochs(tmp_path, monkeypatch):
    x = torch.rand(4, 1, 8, 8)
    runs = {}
    for scale in ("fixed", "per_sample"):
        figures = _spy(monkeypatch)
        monitor = AttributionMonitor(methods=(_planted_maps(),), probe=x, scale=scale, evolution_samples=2)
        _fit(tmp_path / scale, [monitor], epochs=2)
        runs[scale] = figures["attribution_figure"]
        first, second = runs[scale]
        box = first.layout.cells[(0, 1)]  # sample 0's heatmap
        assert box == second.layout.cells[(0, 1)]
        x0, y0, x1, y1 = box
        assert torch.equal(first.image[:, y0:y1, x0:x1], second.image[:, y0:y1, x0:x1])  # same map, same colours
    fixed = runs["fixed"]
    assert fixed[0].layout.scale == fixed[1].layout.scale  # the colour bar did not move either
    assert "scale fixed at epoch 0" in " ".join(fixed[1].layout.text("colorbar"))
    # and on the fixed scale a stronger peak is a brighter colour: sample 1's peak is clipped, sample 0's is not
    (x0, y0, x1, y1), (u0, v0, u1, v1) = fixed[1].layout.cells[(0, 1)], fixed[1].layout.cells[(1, 1)]
    img = fixed[1].image
    assert float(img[:, y0:y1, x0:x1].sum(0).max()) < float(img[:, v0:v1, u0:u1].sum(0).max())
    assert "own 99th percentile" in " ".join(runs["per_sample"][0].layout.text("colorbar"))


def test_evolution_grows_one_column_per_explained_epoch(tmp_path, monkeypatch):
    figures = _spy(monkeypatch)["evolution_figure"]
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=10, evolution_samples=3)
    trainer, _ = _fit(tmp_path, [monitor], epochs=3)
    headers = [fig.layout.text("header") for fig in figures]
    assert headers == [["input", "0"], ["input", "0", "1"], ["input", "0", "1", "2"]]
    for k, fig in enumerate(figures):
        assert {col for _, col in fig.layout.cells} == set(range(k + 2))  # input + one column per explained epoch
        assert len({row for row, _ in fig.layout.cells}) == 3  # the evolution samples
        assert fig.layout.text("group") == ["epoch"]
    events = read_events(trainer.logger.log_dir).Images("xai/attribution/saliency/evolution")
    widths = [ev.width for ev in events]
    assert len(widths) == 3 and widths[0] <= widths[1] <= widths[2]
    pitch = [figures[k + 1].layout.cells[(0, k + 2)][0] - figures[k + 1].layout.cells[(0, k + 1)][0]
             for k in range(2)]
    assert pitch[0] == pitch[1] > 0  # one more column each time, at the same pitch
    # the rows shown are spread over the probe set (grouped by class): different classes
    rows = [fig for fig in figures[-1].layout.text("row") if fig.startswith("label ")]
    assert len(set(rows)) == 3
    runs = sorted(monitor.evolution["saliency"])  # (epoch, global step): one run per epoch here
    assert [e for e, _ in runs] == [0, 1, 2] and monitor.evolution["saliency"][runs[2]].dtype == torch.float16


def test_top_share_bounds():
    uniform = torch.ones(2, 1, 10, 10)
    peaked = torch.zeros(2, 1, 10, 10)
    peaked[:, :, 0, 0] = 5.0
    assert torch.allclose(top_share(uniform, 0.05), torch.full((2,), 0.05))
    assert torch.allclose(top_share(peaked, 0.05), torch.ones(2))


def test_do_no_harm_bit_identical_weights(tmp_path):
    _, plain = _fit(tmp_path / "a", [])
    methods = ("saliency", ("smoothgrad", {"samples": 4}), ("integrated_gradients", {"steps": 4}))
    monitor = AttributionMonitor(methods=methods,
                                 probe_samples=8)
    _, explained = _fit(tmp_path / "b", [monitor])
    assert monitor.last_explained_epoch == 1
    a, b = trained_weights(plain), trained_weights(explained)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_explains_same_probe_set(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = AttributionMonitor(methods=("saliency",), probe_samples=6)
    _fit(tmp_path, [first, ckpt], epochs=1, enable_checkpointing=True)
    state = first.state_dict()
    assert state["probe_x"].shape == (6, 1, 8, 8) and state["last_explained_epoch"] == 0

    resumed = AttributionMonitor(methods=("saliency",), probe_samples=6)
    pl.seed_everything(0)
    model = DigitsModule(small_cnn(dropout=0.2))
    # a different validation order: without the checkpoint the probe set would differ
    train, val = digits_loaders(n_val=96)
    trainer = tiny_trainer(tmp_path / "resumed", callbacks=[resumed], max_epochs=2)
    trainer.fit(model, train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed.probe_x, first.probe_x) and torch.equal(resumed.probe_y, first.probe_y)
    assert resumed.last_explained_epoch == 1


def test_quiet_under_fast_dev_run(tmp_path):
    monitor = AttributionMonitor(methods=("saliency",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, [monitor], fast_dev_run=True, logger=None)
    assert monitor.probe_x is None and monitor.last_explained_epoch == -2
    assert not [w for w in caught if "AttributionMonitor" in str(w.message)]


@pytest.mark.parametrize("fn", ["validate", "test"])
def test_validate_and_test_under_inference_mode(tmp_path, fn):
    monitor = AttributionMonitor(methods=FAST, probe_samples=5)
    model = DigitsModule()
    _, val = digits_loaders()
    seen = []

    class Spy(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append(torch.is_inference_mode_enabled())

        on_test_epoch_end = on_validation_epoch_end

    trainer = tiny_trainer(tmp_path, callbacks=[monitor, Spy()])
    getattr(trainer, fn)(model, val)
    assert seen == [True]  # Lightning evaluates under inference_mode here
    acc = read_events(trainer.logger.log_dir)
    assert "xai/attribution/integrated_gradients" in acc.Tags()["images"]
    assert monitor.errors == 0


@pytest.mark.parametrize("fn", ["validate", "test"])
def test_validate_without_a_logger_returns_the_scalars_without_a_warning_each(tmp_path, fn, monkeypatch):
    """``logger=False``: the scalars still reach what ``validate()`` returns, and Lightning is not asked to log them
    to a logger there is none of (it warned once per scalar)."""
    monkeypatch.chdir(tmp_path)  # the PNGs go to ./xai/
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=4)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = getattr(trainer, fn)(DigitsModule(), digits_loaders()[1])
    assert any(k.startswith("xai/attribution/saliency/") for k in out[0]), out
    assert not [w for w in caught if "no logger configured" in str(w.message)]


def test_validate_then_test_without_a_logger_keep_both_files(tmp_path):
    """The PNG fallback names a file by tag and step, and by stage outside fit: validate() and then test() at the
    same step write two files, not one over the other."""
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[AttributionMonitor(methods=("saliency",), probe_samples=4)])
    model, val = DigitsModule(), digits_loaders()[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(model, val, verbose=False)
        trainer.test(model, val, verbose=False)
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "xai" / "*saliency_*step*.png")))
    want = ["xai_attribution_saliency_test_step0000000.png", "xai_attribution_saliency_validate_step0000000.png"]
    assert [n for n in names if "evolution" not in n] == want


def test_no_logger_writes_png_and_warns_once(tmp_path):
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=4)
    with pytest.warns(RuntimeWarning, match="PNG") as record:
        _fit(tmp_path, [monitor], logger=False)
    pngs = sorted(glob.glob(str(tmp_path / "xai" / "*.png")))
    assert len(pngs) == 4  # the figure and the evolution figure, two epochs
    assert sum("evolution" in os.path.basename(p) for p in pngs) == 2
    assert sum("PNG" in str(w.message) for w in record) == 1


def test_csv_logger_gets_scalars_and_png_fallback(tmp_path):
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=4)
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    with pytest.warns(RuntimeWarning, match="PNG"):
        trainer, _ = _fit(tmp_path, [monitor], logger=logger)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as fh:
        header = fh.readline()
    assert "xai/attribution/saliency/top5_share" in header
    assert glob.glob(os.path.join(logger.log_dir, "xai", "*.png"))


def test_error_policy_warns_and_training_goes_on(tmp_path):
    calls = {"n": 0}

    def broken_forward(module, x):
        calls["n"] += 1
        raise RuntimeError("boom in explanation")

    monitor = AttributionMonitor(methods=("saliency",), probe_samples=4, forward=broken_forward)
    with pytest.warns(RuntimeWarning, match="boom in explanation") as record:
        trainer, model = _fit(tmp_path, [monitor])
    assert trainer.current_epoch == 2 and monitor.errors == 2
    assert sum("boom" in str(w.message) for w in record) == 1  # warned once
    assert hook_count(model) == 0

    raising = AttributionMonitor(methods=("saliency",), probe_samples=4, forward=broken_forward, on_error="raise")
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path / "raise", [raising])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"methods": ("no_such_method",)}, "saliency", id="unknown-method"),
        pytest.param({"methods": ()}, "at least one", id="no-method"),
        pytest.param({"target": "labels"}, "prediction", id="bad-target"),
        pytest.param({"every_n_epochs": 0}, "every_n_epochs", id="bad-cadence"),
        pytest.param({"on_error": "ignore"}, "on_error", id="bad-policy"),
        pytest.param({"probe": torch.zeros(3, 5)}, "images of shape", id="non-image-probe"),
        pytest.param({"probe": (torch.zeros(3, 1, 8, 8), torch.zeros(4))}, "probe labels", id="label-count"),
        pytest.param({"probe": torch.zeros(3, 1, 8, 8, dtype=torch.long)}, "floating-point", id="int-probe"),
        pytest.param({"scale": "per_epoch"}, "per_sample", id="bad-scale"),
        pytest.param({"evolution_samples": -1}, "evolution_samples", id="bad-evolution-samples"),
    ],
)
def test_bad_configuration_is_reported(tmp_path, kwargs, match):
    with pytest.raises((MisconfigurationException, ValueError, TypeError), match=match):
        monitor = AttributionMonitor(**kwargs)
        trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=1)
        train, val = digits_loaders()
        trainer.fit(DigitsModule(), train, val)


def test_user_probe_prediction_target_and_fixed_class(tmp_path):
    x = torch.rand(3, 1, 8, 8)
    for target, desc in (("prediction", "prediction"), (7, "class 7")):
        monitor = AttributionMonitor(methods=("saliency",), probe=x, target=target)
        trainer, _ = _fit(tmp_path / str(target), [monitor], epochs=1)
        text = read_text(read_events(trainer.logger.log_dir), "xai/attribution/probes")
        assert f"explained class: {desc}" in text
        if target == 7:
            assert all(row.split("|")[5].strip() == "7" for row in text.splitlines()[4:])


def test_tuple_output_needs_output_key(tmp_path):
    class TupleNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = small_cnn()

        def forward(self, x):
            return self.inner(x), {"aux": 0}

    class TupleModule(DigitsModule):
        def forward(self, x):
            return self.net(x)[0]

    model = TupleModule(TupleNet())
    bad = AttributionMonitor(methods=("saliency",), probe_samples=4, on_error="raise")
    good = AttributionMonitor(methods=("saliency",), probe_samples=4, forward=lambda m, x: m.net(x)[0], prefix="ok")
    _, val = digits_loaders()
    tiny_trainer(tmp_path, callbacks=[good]).validate(model, val)
    assert good.last_explained_epoch == 0

    class RawTuple(DigitsModule):
        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            pass

    with pytest.raises(TypeError, match="output_key"):
        tiny_trainer(tmp_path / "bad", callbacks=[bad]).validate(RawTuple(TupleNet()), val)
    keyed = AttributionMonitor(methods=("saliency",), probe_samples=4, output_key=0, on_error="raise")
    tiny_trainer(tmp_path / "keyed", callbacks=[keyed]).validate(RawTuple(TupleNet()), val)
    assert keyed.last_explained_epoch == 0


def test_captum_object_as_method(tmp_path):
    captum = pytest.importorskip("captum.attr")
    monitor = AttributionMonitor(methods=(captum.Saliency,), probe_samples=4)
    trainer, _ = _fit(tmp_path, [monitor], epochs=1)
    tags = read_events(trainer.logger.log_dir).Tags()["images"]
    assert any(t.startswith("xai/attribution/") for t in tags)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_event_files_open_in_a_real_tensorboard(tmp_path):
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=4)
    trainer, _ = _fit(tmp_path, [monitor], epochs=1)
    port = _free_port()
    tb = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    proc = subprocess.Popen([tb, "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
                             "--load_fast", "false", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tags, deadline = {}, time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags", timeout=2) as resp:
                    tags = json.loads(resp.read())
                if any("xai/attribution/saliency" in run_tags for run_tags in tags.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert any("xai/attribution/saliency" in run_tags for run_tags in tags.values()), tags
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_an_epoch_validated_twice_keeps_both_runs_as_columns(tmp_path, monkeypatch):
    # val_check_interval=0.5: two validations per epoch, each explained; the second must not replace the first
    figures = _spy(monkeypatch)["evolution_figure"]
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=6, evolution_samples=2)
    trainer, _ = _fit(tmp_path, [monitor], epochs=2, val_check_interval=0.5)
    runs = sorted(monitor.evolution["saliency"])
    assert [e for e, _ in runs] == [0, 0, 1, 1] and len({s for _, s in runs}) == 4
    assert runs[-1][1] == trainer.global_step
    header = figures[-1].layout.text("header")
    assert header == ["input"] + [f"{e}@{s}" for e, s in runs]
    assert "epoch@step" in " ".join(figures[-1].layout.text("subtitle"))
    assert len(read_events(trainer.logger.log_dir).Images("xai/attribution/saliency/evolution")) == 4


def test_state_from_before_runs_were_told_apart_loads(tmp_path):
    # a checkpoint whose evolution is keyed by the epoch alone: read as (epoch, -1), labelled by the epoch
    monitor = AttributionMonitor(methods=("saliency",))
    maps = torch.zeros(2, 4, 4, dtype=torch.float16)
    monitor.load_state_dict({"evolution": {"saliency": {0: maps, 1: maps}}, "evolution_preds": {1: torch.zeros(2, 2)}})
    assert sorted(monitor.evolution["saliency"]) == [(0, -1), (1, -1)] and list(monitor.evolution_preds) == [(1, -1)]
    restored = AttributionMonitor(methods=("saliency",))
    restored.load_state_dict(monitor.state_dict())
    assert sorted(restored.evolution["saliency"]) == [(0, -1), (1, -1)]
