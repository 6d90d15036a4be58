"""LinearProbeMonitor in a real Trainer: tags and values read back from TensorBoard, baselines,
memorisation warning, do-no-harm, hook hygiene, configuration errors, state."""
import contextlib
import io
import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from helpers import (DigitsModule, FigureSpy, digits_loaders, hook_count, png_equals, read_events, tiny_trainer,
                     trained_weights)
from lightning_xai.callbacks._probes import LinearProbeMonitor
from lightning_xai.probes import Reducer

LAYERS = ["net.0.2", "net.0.4", "net.1.3"]
DRAWN = {}  # the figures the module fixture's run drew


def _fit(tmp_path, callbacks, n_train=256, n_val=400, max_epochs=2, logger=True, module=None, **kwargs):
    pl.seed_everything(0)
    train, val = digits_loaders(n_train, n_val, batch_size=64)
    module = module or DigitsModule()
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, logger=logger, max_epochs=max_epochs, **kwargs)
    trainer.fit(module, train, val)
    return trainer, module


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("probes")
    monitor = LinearProbeMonitor(layers=LAYERS, concepts={
                                 "big": lambda batch: (batch[1] >= 5).long()}, on_error="raise")
    import lightning_xai.callbacks._probes as probes_module

    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("always")
        DRAWN["matrix_figure"] = FigureSpy(mp, probes_module, "matrix_figure")["matrix_figure"]
        trainer, module = _fit(tmp_path, [monitor])
    return monitor, trainer, module, read_events(tmp_path / "tb" / "version_0"), caught


def test_scalars_reach_tensorboard(fitted):
    monitor, _, _, events, _ = fitted
    tags = set(events.Tags()["scalars"])
    for layer in ["input"] + LAYERS:
        for metric in ("accuracy", "selectivity", "control_accuracy"):
            assert f"xai/probe/{layer}/{metric}" in tags
            assert f"xai/probe/{layer}/big/{metric}" in tags
    for layer in LAYERS:
        assert f"xai/probe/{layer}/untrained_accuracy" in tags
    for layer in LAYERS:
        acc = [e.value for e in events.Scalars(f"xai/probe/{layer}/accuracy")]
        ctrl = [e.value for e in events.Scalars(f"xai/probe/{layer}/control_accuracy")]
        sel = [e.value for e in events.Scalars(f"xai/probe/{layer}/selectivity")]
        assert len(acc) == 2  # one value per epoch
        assert sel == pytest.approx([a - c for a, c in zip(acc, ctrl)], abs=1e-6)
        assert all(c < 0.3 for c in ctrl)  # shuffled labels: near chance (0.1) on held-out samples


def test_input_baseline_on_digits(fitted):
    monitor, _, _, events, _ = fitted
    acc = [e.value for e in events.Scalars("xai/probe/input/accuracy")]
    assert acc[0] == pytest.approx(0.92, abs=0.05)  # raw pixels already probe well (reference: 0.92)
    assert monitor.baselines["input"]["accuracy"] == pytest.approx(acc[0])
    assert 0.8 < monitor.baselines["input"]["big/accuracy"] <= 1.0


def test_heatmap_custom_scalars_and_table(fitted):
    monitor, _, _, events, _ = fitted
    images = events.Images("xai/probe/heatmap")
    assert len(images) == 2
    values, rows, cols = monitor.heatmap_values()
    assert rows == ["input"] + LAYERS and cols == ["untrained", "0", "1"]
    accuracy, selectivity = DRAWN["matrix_figure"][-2:]  # the last epoch's two figures
    assert png_equals(images[-1].encoded_image_string, accuracy.image)
    layout = accuracy.layout
    assert layout.text("title") == ["linear-probe accuracy (held-out, %) · epoch 1"]
    assert layout.text("row") == rows and layout.text("header") == ["init", "0", "1"]  # a labelled layer x epoch matrix
    assert layout.text("value") == [f"{float(v):.0f}" for v in (100 * values).flatten()]  # the accuracy in each cell
    assert layout.cells.keys() == {(i, j) for i in range(len(rows)) for j in range(len(cols))}
    assert "colorbar" in layout.regions and layout.scale == ("viridis", 0.0, 100.0)
    sel, _, _ = monitor.heatmap_values("selectivity")
    assert selectivity.layout.text("value") == [f"{float(v):+.0f}" for v in (100 * sel).flatten()]
    assert selectivity.layout.scale == ("RdBu_r", -100.0, 100.0)
    assert png_equals(events.Images("xai/probe/heatmap_selectivity")[-1].encoded_image_string, selectivity.image)
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    layout = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0].decode("latin-1")
    assert "xai/probe/net\\.0\\.4/selectivity" in layout
    assert "xai/probe/table/text_summary" in events.Tags()["tensors"]


def test_untrained_baseline_is_the_model_at_fit_start(fitted):
    monitor, _, _, _, _ = fitted
    # the trained first conv layer must not be scored from the untrained copy's features
    for layer in LAYERS:
        base = monitor.baselines["untrained/" + layer]
        assert 0.0 <= base["control_accuracy"] < 0.3 and 0.1 < base["accuracy"] <= 1.0
    # layers are probed each epoch and every epoch is in the history
    assert [e for e, _ in sorted(monitor.history["net.0.4"])] == [0, 1]


def test_declared_passes_are_the_untrained_forward_only(tmp_path):
    # the features come from Lightning's validation forward: only the untrained copy's forward is a model pass
    class Declared(pl.Callback):
        def __init__(self, monitor):
            self.monitor, self.seen = monitor, []

        def on_validation_epoch_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.seen.append(self.monitor.estimated_work(trainer))

    with_copy = LinearProbeMonitor(layers=LAYERS[:1])
    without = LinearProbeMonitor(layers=LAYERS[1:2], untrained_baseline=False)
    spies = [Declared(with_copy), Declared(without)]
    _fit(tmp_path, [with_copy, without] + spies, logger=False, max_epochs=3)
    assert spies[0].seen == [pytest.approx(400 / 3), 0.0, 0.0]
    assert spies[1].seen == [0.0, 0.0, 0.0]
    waiting = LinearProbeMonitor(layers=LAYERS[:1])
    waiting._untrained = torch.nn.Linear(1, 1)  # a copy still to be probed, and no trainer to say how many samples
    assert waiting.estimated_passes() is None


def test_hooks_removed_after_validation(fitted):
    _, _, module, _, _ = fitted
    assert hook_count(module) == 0


def test_state_dict_holds_plain_types_and_round_trips(fitted):
    monitor, _, _, _, _ = fitted
    state = monitor.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    other = LinearProbeMonitor(layers=LAYERS)
    other.load_state_dict(loaded)
    assert other.history == monitor.history and other.baselines == monitor.baselines


def test_memorisation_warning_on_flattened_maps(tmp_path):
    monitor = LinearProbeMonitor(layers=["net.0.4", "net.1.3"], reduce={"net.0.4": "flatten"}, untrained_baseline=False)
    with pytest.warns(RuntimeWarning, match=r"'net\.0\.4' memorises shuffled labels"):
        _fit(tmp_path, [monitor], n_val=320, max_epochs=1, logger=False)
    (first,) = monitor.history["net.0.4"]  # the one epoch's run: (epoch, global step)
    assert monitor.history["net.0.4"][first]["control_train_accuracy"] >= 0.9
    assert monitor.history["net.1.3"][first]["control_train_accuracy"] < 0.9


def test_training_is_bit_identical_with_and_without_monitor(tmp_path):
    _, plain = _fit(tmp_path / "a", [], logger=False)
    monitor = LinearProbeMonitor(layers=["net.0.*", "net.1.*"], concepts={"big": lambda b: (b[1] >= 5).long()})
    _, probed = _fit(tmp_path / "b", [monitor], logger=False)
    assert monitor.history  # it did run
    a, b = trained_weights(plain), trained_weights(probed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all(p.grad is None or torch.equal(p.grad, q.grad) for p, q in zip(plain.parameters(), probed.parameters()))
    assert [m.training for m in plain.modules()] == [m.training for m in probed.modules()]
    assert hook_count(probed) == 0


class _Failing(DigitsModule):
    def validation_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("forced failure in validation_step")
        return super().validation_step(batch, batch_idx)


def test_hooks_removed_after_exception_in_validation(tmp_path):
    module = _Failing()
    monitor = LinearProbeMonitor(layers=["net.0.*"])
    with pytest.raises(RuntimeError, match="forced failure"):
        _fit(tmp_path, [monitor], module=module, max_epochs=1, logger=False)
    assert hook_count(module) == 0
    assert not monitor._capture.attached


def test_unknown_layer_fails_at_setup_listing_valid_names(tmp_path):
    monitor = LinearProbeMonitor(layers=["net.0.4", "features.9"])
    with pytest.raises(MisconfigurationException, match=re.escape("net.0.0, net.0.1")):
        _fit(tmp_path, [monitor], max_epochs=1, logger=False)


@pytest.mark.parametrize("kwargs", [
    pytest.param(dict(layers=[]), id="no-layers"),
    pytest.param(dict(layers=["a"], solver="svm"), id="solver"),
    pytest.param(dict(layers=["a"], holdout_every=1), id="holdout"),
    pytest.param(dict(layers=["a"], concepts={"label": len}), id="concept-name"),
    pytest.param(dict(layers=["a"], cv=1), id="cv"),
    pytest.param(dict(layers=["a"], reduce="median"), id="reduce"),
])
def test_bad_arguments_fail_early(kwargs):
    with pytest.raises((MisconfigurationException, ValueError, TypeError)):
        monitor = LinearProbeMonitor(**kwargs)
        monitor.setup(tiny_trainer("/tmp/unused", logger=False), DigitsModule(), "fit")


def test_quiet_under_fast_dev_run(tmp_path):
    monitor = LinearProbeMonitor(layers=["net.0.4"])
    _fit(tmp_path, [monitor], fast_dev_run=True, logger=False)
    assert monitor.history == {} and monitor.baselines == {}


@pytest.mark.parametrize("options", [pytest.param(dict(solver="logistic"), id="logistic"),
                                     pytest.param(dict(cv=3, reduce="gap+max"), id="ridge-3fold")])
def test_validate_only_runs_under_inference_mode(tmp_path, options):
    pl.seed_everything(0)
    _, val = digits_loaders(64, 200, batch_size=50)
    module = DigitsModule()
    monitor = LinearProbeMonitor(layers=["net.0.4"], **options)
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], logger=False)
    metrics = trainer.validate(module, val, verbose=False)[0]
    assert "xai/probe/net.0.4/accuracy" in metrics and "xai/probe/input/accuracy" in metrics
    assert "untrained/net.0.4" not in monitor.baselines  # no fit, no untrained snapshot
    assert hook_count(module) == 0


class _BrokenReducer(Reducer):
    def __call__(self, act):
        raise RuntimeError("reducer exploded")


def test_a_failing_probe_warns_and_never_stops_training(tmp_path):
    pl.seed_everything(0)
    _, val = digits_loaders(64, 100, batch_size=50)
    module = DigitsModule()
    monitor = LinearProbeMonitor(layers=["net.0.4"], reduce=_BrokenReducer())
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], logger=False)
    with pytest.warns(RuntimeWarning, match="reducer exploded"):
        trainer.validate(module, val, verbose=False)
    assert monitor.errors == 1 and monitor.history == {} and hook_count(module) == 0
    with pytest.raises(RuntimeError, match="reducer exploded"):
        tiny_trainer(tmp_path, logger=False, callbacks=[
            LinearProbeMonitor(layers=["net.0.4"], reduce=_BrokenReducer(), on_error="raise")]
        ).validate(module, val, verbose=False)
    assert hook_count(module) == 0


def test_untrained_forward_stops_after_the_deepest_probed_layer(tmp_path, monkeypatch):
    """The untrained copy's layers past the deepest probed one never run, and the baseline is what a whole forward
    gives; the stopping hooks are gone after each forward."""
    ran = []

    class CountLater(pl.Callback):
        def __init__(self, monitor):
            self.monitor = monitor

        def on_validation_epoch_start(self, trainer, pl_module):
            copy = self.monitor._untrained
            if copy is not None and not trainer.sanity_checking:
                later = list(copy.net.children())[-1]
                later.register_forward_hook(lambda *args: ran.append(1))
                self.layer, self.hooks = copy.net[0][2], []

        def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs):
            if hasattr(self, "layer"):
                self.hooks.append(len(self.layer._forward_hooks))  # after the copy's forward of this batch

    def baselines(run_whole):
        if run_whole:  # the capture's stopping hooks made inert: a whole forward of the copy
            from lightning_xai.probes import _capture

            monkeypatch.setattr(_capture.ActivationCapture, "stopping", lambda self, rows: contextlib.nullcontext())
        monitor = LinearProbeMonitor(layers=["net.0.2"], on_error="raise")
        spy = CountLater(monitor)
        _fit(tmp_path / str(run_whole), [monitor, spy], logger=False, max_epochs=1)
        assert spy.hooks and set(spy.hooks) == {1}  # the capture's hook only: each stopping hook was removed
        return monitor.baselines["untrained/net.0.2"]

    stopped = baselines(False)
    assert ran == []  # the copy's head never ran
    whole = baselines(True)
    assert ran  # it does in a whole forward
    assert stopped == whole


def test_an_epoch_probed_twice_keeps_both_runs(tmp_path):
    # val_check_interval=0.5: two probe fits per epoch, each a column of its own (epoch@step), scalars at each
    monitor = LinearProbeMonitor(layers=["net.0.4"], untrained_baseline=False, on_error="raise")
    trainer, _ = _fit(tmp_path, [monitor], n_val=320, max_epochs=2, val_check_interval=0.5)
    runs = sorted(monitor.history["net.0.4"])
    assert [e for e, _ in runs] == [0, 0, 1, 1] and len({s for _, s in runs}) == 4
    values, rows, cols = monitor.heatmap_values()
    assert cols == [f"{e}@{s}" for e, s in runs] and rows == ["input", "net.0.4"]
    assert torch.equal(values[1], torch.tensor([monitor.history["net.0.4"][r]["accuracy"] for r in runs]))
    events = read_events(trainer.logger.log_dir)
    assert [e.step for e in events.Scalars("xai/probe/net.0.4/accuracy")] == [s for _, s in runs]
    old = LinearProbeMonitor(layers=["net.0.4"])  # a checkpoint keyed by the epoch alone still loads
    old.load_state_dict({"history": {"net.0.4": {0: {"accuracy": 0.5}}}, "baselines": {}})
    assert old.history == {"net.0.4": {(0, -1): {"accuracy": 0.5}}} and old.heatmap_values()[2] == ["0"]


def _probe_scalars(trainer, part):
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("xai/probe/") and part in k}


def test_a_float_concept_with_whole_values_is_probed_as_its_integer_twin(tmp_path):
    runs = {}
    for kind, fn in (("int", lambda b: (b[1] % 2).long()), ("float", lambda b: (b[1] % 2).float())):
        monitor = LinearProbeMonitor(layers=["net.0.4"], concepts={"odd": fn}, untrained_baseline=False,
                                     on_error="raise")
        trainer, _ = _fit(tmp_path / kind, [monitor], n_val=320, max_epochs=1, logger=False)
        runs[kind] = _probe_scalars(trainer, "/odd/")
    assert runs["float"] and runs["float"] == runs["int"]


@pytest.mark.parametrize("values, says", [
    (lambda y: (y % 2) - 1, "values down to -1"),  # classes {-1, 0}: not class indices
    (lambda y: (y % 2).float() / 2, "values such as 0.5"),
    (lambda y: (y % 2)[:-1], "a tensor of shape"),
])
def test_a_bad_concept_is_dropped_with_one_warning_and_the_label_probes_go_on(tmp_path, values, says):
    monitor = LinearProbeMonitor(layers=["net.0.4"], concepts={"c": lambda b: values(b[1])}, untrained_baseline=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(tmp_path, [monitor], n_val=320, max_epochs=2, logger=False)
    dropped = [str(w.message) for w in caught if "concept 'c'" in str(w.message)]
    assert len(dropped) == 1 and says in dropped[0] and "class indices >= 0" in dropped[0]
    assert "batch_to_xy" not in dropped[0]  # the concept's fault, not the batch format's
    assert not _probe_scalars(trainer, "/c/")  # the input baseline's neither
    assert [e for e, _ in sorted(monitor.history["net.0.4"])] == [0, 1]  # the label probe at both epochs
    assert "xai/probe/net.0.4/accuracy" in trainer.callback_metrics
    resumed = LinearProbeMonitor(layers=["net.0.4"], concepts={"c": lambda b: values(b[1])})
    resumed.load_state_dict(monitor.state_dict())  # a resumed fit does not try the concept again
    assert list(resumed._dropped) == ["c"]


class _WithUnusedHead(DigitsModule):
    def __init__(self):
        super().__init__()
        self.aux = torch.nn.Linear(4, 4)  # defined, never called in forward


def test_a_layer_that_does_not_run_is_left_out_and_the_others_are_probed(tmp_path):
    monitor = LinearProbeMonitor(layers=["net.0.4", "aux"], on_error="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(tmp_path, [monitor], n_val=320, max_epochs=1, logger=False, module=_WithUnusedHead())
    said = [str(w.message) for w in caught if "did not run" in str(w.message)]
    assert len(said) == 1 and "['aux']" in said[0] and "['net.0.4'] are" in said[0]
    assert "too few" not in " ".join(str(w.message) for w in caught)
    assert set(monitor.history) == {"net.0.4"} and "untrained/net.0.4" in monitor.baselines
    assert "xai/probe/net.0.4/accuracy" in trainer.callback_metrics


def test_when_no_listed_layer_runs_the_input_is_still_probed_and_only_that_is_said(tmp_path):
    monitor = LinearProbeMonitor(layers=["aux"], on_error="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = _fit(tmp_path, [monitor], n_val=320, max_epochs=1, logger=False, module=_WithUnusedHead())
    said = [str(w.message) for w in caught if "LinearProbeMonitor" in str(w.message)]
    assert any("['aux'] did not run" in m for m in said) and not any("too few" in m for m in said), said
    assert "xai/probe/input/accuracy" in trainer.callback_metrics and not monitor.history


def test_a_bad_concept_raises_under_on_error_raise(tmp_path):
    monitor = LinearProbeMonitor(layers=["net.0.4"], concepts={"c": lambda b: b[1] - 1}, on_error="raise",
                                 untrained_baseline=False)
    with pytest.raises(ValueError, match=r"concepts\['c'\]\(batch\)"):
        _fit(tmp_path, [monitor], n_val=320, max_epochs=1, logger=False)
