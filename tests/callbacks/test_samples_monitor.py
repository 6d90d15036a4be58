"""SampleInfluenceMonitor in a real Trainer: TensorBoard output, do no harm, hygiene, errors, resume, validate()."""

import math
import warnings

import pytest
import torch
from pytorch_lightning import Callback, Trainer, seed_everything
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from helpers import DigitsModule, FigureSpy, assert_unchanged, digits_data, digits_loaders, hook_count, png_equals, \
    read_events, read_text, snapshot, tiny_trainer, trained_weights
from lightning_xai.callbacks._samples import SampleInfluenceMonitor

_TAGS = ("neighbours", "representers", "suspects", "sparse")


def _monitor(**kw):
    opts = dict(every_n_epochs=1, probe_samples=4, k=3, support_k=3, num_representers=2, num_suspects=6, num_sparse=2,
                max_train_samples=96, on_error="raise")
    opts.update(kw)
    return SampleInfluenceMonitor(**opts)


class _Guard(Callback):
    """Snapshots the module before the monitor's validation-end hook and checks it after (placed around it)."""

    def __init__(self, shared, check):
        self.shared, self.check = shared, check

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self.check:
            self.shared["before"] = snapshot(pl_module)
        else:
            assert_unchanged(self.shared["before"], pl_module)
            self.shared["checked"] = self.shared.get("checked", 0) + 1


def _fit(tmp_path, callbacks, name, max_epochs=2):
    seed_everything(0)
    train, val = digits_loaders(128, 48)
    module = DigitsModule()
    trainer = tiny_trainer(tmp_path / name, callbacks=callbacks, max_epochs=max_epochs)
    trainer.fit(module, train, val)
    return trainer, module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("samples")
    shared = {}
    monitor = _monitor()
    import lightning_xai.callbacks._samples as samples_module

    with pytest.MonkeyPatch.context() as mp:
        drawn = FigureSpy(mp, samples_module, "grid_figure")
        trainer, module = _fit(tmp, [_Guard(shared, False), monitor, _Guard(shared, True)], "with")
    _, baseline = _fit(tmp, [], "without")
    return dict(tmp=tmp, monitor=monitor, trainer=trainer, module=module, baseline=baseline, shared=shared,
                events=read_events(tmp / "with" / "tb" / "version_0"), drawn=drawn)


def test_tensorboard_images_tables_and_scalars(runs):
    acc = runs["events"]
    tags = acc.Tags()
    for name in _TAGS:
        assert f"xai/samples/{name}" in tags["images"]
        assert f"xai/samples/{name}/table/text_summary" in tags["tensors"]
    images = acc.Images("xai/samples/neighbours")
    assert len(images) == 2  # epochs 0 and 1
    drawn = runs["drawn"]
    neighbours = drawn.titled("grid_figure", "nearest training samples · epoch 1")[-1]
    assert png_equals(images[-1].encoded_image_string, neighbours.image)
    lay = neighbours.layout
    assert lay.cells.keys() == {(i, j) for i in range(4) for j in range(1 + 3)}  # 4 probe rows, the probe + k = 3
    assert lay.text("header") == ["probe", "1", "2", "3"] and lay.text("group") == ["most similar training samples"]
    probe_y = runs["monitor"].probe_y.tolist()
    assert [c for c in lay.text("caption") if c.startswith("label ")] == [f"label {v}" for v in probe_y]
    assert sum(c.startswith("y ") for c in lay.text("caption")) == 4 * 3  # every training cell's label
    assert lay.text("legend") == ["probe sample", "labelled as the probe's prediction", "labelled otherwise"]
    rep = drawn.titled("grid_figure", "representer points · epoch 1")[-1]
    assert png_equals(acc.Images("xai/samples/representers")[-1].encoded_image_string, rep.image)
    assert rep.layout.text("group") == ["push the predicted logit up", "push it down"]
    assert {"divider 1", "divider 3"} <= set(rep.layout.regions)  # between the probe, the ups and the downs
    up_x1 = max(b[2] for (i, j), b in rep.layout.cells.items() if i == 0 and j in (1, 2))
    down_x0 = min(b[0] for (i, j), b in rep.layout.cells.items() if i == 0 and j in (3, 4))
    assert up_x1 < rep.layout.regions["divider 3"][0] < down_x0
    suspects = drawn.titled("grid_figure", "suspected label errors · epoch 1")[-1]
    assert sum(c.startswith("given ") for c in suspects.layout.text("caption")) == 6
    gap = acc.Scalars("xai/samples/decomposition_gap")[-1].value
    assert gap < 1e-8
    for name in ("mean_support", "min_support", "refit_agreement", "neighbour_agreement"):
        value = acc.Scalars(f"xai/samples/{name}")[-1].value
        assert -1.0 <= value <= 1.0
    from tensorboard.util import tensor_util

    proto = acc.Tensors("xai/samples/suspects/table/text_summary")[-1].tensor_proto
    text = tensor_util.make_ndarray(proto).item().decode()
    assert "| rank | index | given label |" in text and text.count("\n") == 1 + 6


def test_suspects_come_from_the_first_training_samples(runs):
    monitor = runs["monitor"]
    assert monitor.suspects.shape == (6,) and int(monitor.suspects.max()) < 96
    assert torch.all(monitor.suspect_values[:-1] >= monitor.suspect_values[1:])


def test_do_no_harm_bit_identical_weights(runs):
    w_with, w_without = trained_weights(runs["module"]), trained_weights(runs["baseline"])
    assert w_with.keys() == w_without.keys()
    for key in w_with:
        assert torch.equal(w_with[key], w_without[key]), key


def test_state_unchanged_around_each_explanation(runs):
    assert runs["shared"]["checked"] == 2
    assert hook_count(runs["module"]) == 0


def test_error_is_contained_and_leaves_no_trace(tmp_path):
    def boom(pl_module, x):
        pl_module(x)  # the feature hook fires, then the forward fails
        raise RuntimeError("boom")

    shared = {}
    monitor = _monitor(forward=boom, on_error="warn")
    with pytest.warns(RuntimeWarning, match="failed while explaining the probe samples.*boom"):
        _, module = _fit(tmp_path, [_Guard(shared, False), monitor, _Guard(shared, True)], "warn", max_epochs=1)
    assert monitor.errors >= 1 and shared["checked"] == 1 and hook_count(module) == 0

    raising = _monitor(forward=boom, on_error="raise")
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, [raising], "raise", max_epochs=1)


def test_resume_keeps_probe_set_and_suspects(tmp_path):
    seed_everything(0)
    train, val = digits_loaders(128, 48)
    first = _monitor(run_on_fit_end=False, every_n_epochs=1)
    trainer = tiny_trainer(tmp_path, callbacks=[first], max_epochs=1)
    module = DigitsModule()
    trainer.fit(module, train, val)
    ckpt = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(ckpt)

    second = _monitor(run_on_fit_end=False, every_n_epochs=5)  # epoch 1 is not due: nothing recomputed
    other_val, _ = digits_loaders(48, 1)  # different validation samples: a re-chosen probe set would differ
    trainer = tiny_trainer(tmp_path, callbacks=[second], max_epochs=2)
    trainer.fit(DigitsModule(), train, other_val, ckpt_path=ckpt)
    assert torch.equal(second.probe_x, first.probe_x) and torch.equal(second.probe_y, first.probe_y)
    assert torch.equal(second.suspects, first.suspects)


def test_validate_needs_train_data_or_uses_given(tmp_path):
    train_ds, val_ds = digits_data(96, 32)
    from torch.utils.data import DataLoader

    val = DataLoader(val_ds, batch_size=16)
    monitor = _monitor(max_train_samples=None)
    trainer = tiny_trainer(tmp_path / "none", callbacks=[monitor])
    with pytest.warns(RuntimeWarning, match="found no training data"):
        trainer.validate(DigitsModule(), val)

    monitor = _monitor(train_data=train_ds.tensors, layer="net.1.3")
    trainer = tiny_trainer(tmp_path / "given", callbacks=[monitor])
    trainer.validate(DigitsModule(), val)
    acc = read_events(tmp_path / "given" / "tb" / "version_0")
    assert "xai/samples/suspects" in acc.Tags()["images"]
    assert int(monitor.suspects.max()) < 96


def test_configuration_errors():
    with pytest.raises(MisconfigurationException, match="Expected `k` to be a positive int"):
        SampleInfluenceMonitor(k=0)
    with pytest.raises(MisconfigurationException, match="Expected `lam` to be a positive float"):
        SampleInfluenceMonitor(lam=-1.0)
    with pytest.raises(MisconfigurationException, match="Expected `suspect_mode`"):
        SampleInfluenceMonitor(suspect_mode="loss")
    with pytest.raises(MisconfigurationException, match="Expected `train_data`"):
        SampleInfluenceMonitor(train_data=(torch.zeros(3, 2), torch.zeros(4)))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(MisconfigurationException, match=r"`layer` to be one of the model's layers: net, net\.0,"):
        SampleInfluenceMonitor(layer="head").setup(trainer, DigitsModule(), "fit")


def test_nan_training_and_probe_samples_are_left_out_with_a_warning_each(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    train_ds, val_ds = digits_data(96, 32)
    x, y = (t.clone() for t in train_ds.tensors)
    bad = [3, 40, 77]
    x[bad, 0, 0, 0] = float("nan")  # the samples compared with hold NaN; the model itself is fine
    vx, vy = (t.clone() for t in val_ds.tensors)
    vx[[1, 5], 0, 2, 2] = float("inf")
    monitor = _monitor(train_data=(x, y), max_train_samples=None, probe_samples=8, num_suspects=96)
    import lightning_xai.callbacks._samples as samples_module

    with pytest.MonkeyPatch.context() as mp, pytest.warns(RuntimeWarning) as caught:
        drawn = FigureSpy(mp, samples_module, "grid_figure")["grid_figure"]
        trainer = tiny_trainer(tmp_path, callbacks=[monitor])
        metrics = trainer.validate(DigitsModule(), DataLoader(TensorDataset(vx, vy), batch_size=16), verbose=False)[0]
    said = " ".join(str(w.message) for w in caught)
    assert "3 of 96 training samples gave NaN/inf" in said and "dataset indices [3, 40, 77]" in said
    assert "2 probe samples gave NaN/inf" in said
    assert set(monitor.suspects.tolist()).isdisjoint(bad) and len(monitor.suspects) == 93
    for key in ("mean_support", "min_support", "decomposition_gap", "neighbour_agreement"):
        assert math.isfinite(metrics[f"xai/samples/{key}"]), key
    assert drawn  # the figures are still drawn
    shown = read_text(read_events(tmp_path / "tb" / "version_0"), "xai/samples/neighbours/table")
    assert not any(f"#{i}:" in shown for i in bad)


def test_an_unconverged_refit_is_said_to_be_approximate(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    import lightning_xai.callbacks._samples as samples_module
    import lightning_xai.samples._representer as representer

    train_ds, val_ds = digits_data(96, 32)
    val = DataLoader(val_ds, batch_size=16)
    exact = _monitor(train_data=train_ds.tensors, max_train_samples=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the Newton refit is exact: no warning
        metrics = tiny_trainer(tmp_path / "exact", callbacks=[exact]).validate(DigitsModule(), val, verbose=False)[0]
    assert metrics["xai/samples/decomposition_gap"] < 1e-9
    # as for a layer too wide for the exact Hessian, stopped early: L-BFGS that has not converged
    monkeypatch.setattr(representer, "_NEWTON_MAX_PARAMS", 0)
    fit = samples_module.representer_points
    monkeypatch.setattr(samples_module, "representer_points", lambda *a, **k: fit(*a, **k, max_iter=2))
    rough = _monitor(train_data=train_ds.tensors, max_train_samples=None)
    with pytest.warns(RuntimeWarning, match="the values shown are approximate"):
        metrics = tiny_trainer(tmp_path / "rough", callbacks=[rough]).validate(DigitsModule(), val, verbose=False)[0]
    assert metrics["xai/samples/decomposition_gap"] >= samples_module.SHOWN_GAP


def test_nan_training_labels_leave_their_samples_out(tmp_path):
    from torch.utils.data import DataLoader

    train_ds, val_ds = digits_data(96, 32)
    x, y = train_ds.tensors
    y = y.float()
    y[[7, 50]] = float("nan")  # float labels with two missing
    monitor = _monitor(train_data=(x, y), max_train_samples=None, num_suspects=96)
    with pytest.warns(RuntimeWarning, match=r"2 of 96 training samples gave NaN/inf features, outputs or labels "
                                            r"\(dataset indices \[7, 50\]"):
        trainer = tiny_trainer(tmp_path, callbacks=[monitor])
        trainer.validate(DigitsModule(), DataLoader(val_ds, batch_size=16), verbose=False)
    assert len(monitor.suspects) == 94 and set(monitor.suspects.tolist()).isdisjoint({7, 50})
