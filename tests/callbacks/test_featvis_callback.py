"""Tests of FeatureVisMonitor in a real Trainer: TensorBoard round trip, do no harm, errors, validate()."""
from __future__ import annotations

import glob
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from helpers import FigureSpy, assert_unchanged, png_equals, small_cnn, snapshot
from lightning_xai.callbacks._featvis import FeatureVisMonitor


@pytest.fixture(scope="module")
def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:320], dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target[:320])


class DigitsModule(pl.LightningModule):
    def __init__(self, x, y, fail: bool = False):
        super().__init__()
        self.net = small_cnn()
        self.x, self.y = x, y
        self.fail_when_eval = fail

    def forward(self, x):
        if self.fail_when_eval and not self.training and torch.is_grad_enabled():
            raise RuntimeError("boom in forward")
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=64, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:128], self.y[:128]), batch_size=64)

    test_dataloader = val_dataloader


def _trainer(tmp_path, callbacks, logger=True, **kw):
    args = dict(default_root_dir=tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=2,
                enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                num_sanity_val_steps=1, callbacks=callbacks, deterministic=True)
    if logger:
        args["logger"] = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    else:
        args["logger"] = False
    args.update(kw)
    return pl.Trainer(**args)


def _events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(str(tmp_path), "tb", "version_0", "events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_round_trip(tmp_path, digits_data, monkeypatch):
    import lightning_xai.callbacks._featvis as featvis_module

    drawn = FigureSpy(monkeypatch, featvis_module, "image_figure")["image_figure"]
    monitor = FeatureVisMonitor(targets=[("logits", range(10)), ("net.0.4", "channels", range(4))],
                                every_n_epochs=5, steps=24)
    model = DigitsModule(*digits_data)
    trainer = _trainer(tmp_path, [monitor], max_epochs=3)
    trainer.fit(model)
    acc = _events(tmp_path)
    tags = acc.Tags()
    assert {"xai/featvis/logits", "xai/featvis/net.0.4"} <= set(tags["images"])
    assert {"xai/featvis/logits/activation", "xai/featvis/net.0.4/activation"} <= set(tags["scalars"])
    logits_imgs = acc.Images("xai/featvis/logits")
    assert len(logits_imgs) == 2  # epoch 0 (cadence) and epoch 2 (the last), not epoch 1
    assert logits_imgs[0].step < logits_imgs[1].step
    logits_fig, channels_fig = drawn[-2:]  # the last run's figures, in target-set order
    assert png_equals(logits_imgs[-1].encoded_image_string, logits_fig.image)
    assert png_equals(acc.Images("xai/featvis/net.0.4")[-1].encoded_image_string, channels_fig.image)
    assert logits_fig.layout.text("title") == ["feature visualisation · logits · epoch 2"]
    captions = logits_fig.layout.text("caption")
    assert captions[::2] == [f"class {c}" for c in range(10)]  # a label under every cell, then the value reached
    assert [float(v) for v in captions[1::2]] == pytest.approx(monitor.last_activations["logits"].tolist(), rel=1e-2)
    assert channels_fig.layout.text("caption")[::2] == [f"channel {c}" for c in range(4)]
    assert 1 < logits_fig.layout.columns < 10  # wrapped into rows
    scalars = acc.Scalars("xai/featvis/logits/activation")
    assert len(scalars) == 2 and all(torch.isfinite(torch.tensor(s.value)) for s in scalars)
    assert monitor.input_shape == (1, 8, 8) and monitor.value_range == (0.0, 1.0)
    assert monitor.last_explained_epoch == 2
    assert monitor.last_activations["logits"].shape == (10,)


def _fit_weights(tmp_path, digits_data, callbacks):
    pl.seed_everything(123, workers=True)
    model = DigitsModule(*digits_data)
    trainer = _trainer(tmp_path, callbacks, logger=False, max_epochs=2)
    trainer.fit(model)
    return model


def test_do_no_harm_bit_identical_weights(tmp_path, digits_data):
    plain = _fit_weights(tmp_path / "a", digits_data, [])
    monitor = FeatureVisMonitor(targets=["logits", ("net.0.1", "channels", [0, 1])], every_n_epochs=1,
                                steps=8, param="pixel")  # "logits": the classes read by a forward at the first run
    watched = _fit_weights(tmp_path / "b", digits_data, [monitor])
    assert monitor.last_explained_epoch == 1
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), k  # includes BatchNorm running stats
    assert all(p.requires_grad for p in watched.parameters())


def test_explain_leaves_module_unchanged(tmp_path, digits_data):
    model = DigitsModule(*digits_data)
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    monitor = FeatureVisMonitor(targets=["logits", ("net.0.4", "neurons", [2])], steps=4,
                                input_shape=(1, 8, 8), value_range=(0.0, 1.0))  # the class-reading forward too
    trainer = _trainer(tmp_path, [monitor], logger=False)
    before = snapshot(model)
    monitor.explain(trainer, model, via_module=False)
    assert not monitor._classes_to_read and len(monitor.last_activations["logits"]) == 10  # the classes were read
    assert_unchanged(before, model)


def test_error_policy_warns_and_training_continues(tmp_path, digits_data):
    model = DigitsModule(*digits_data, fail=True)
    monitor = FeatureVisMonitor(targets=[("logits", [0])], every_n_epochs=1, steps=4)
    with pytest.warns(RuntimeWarning, match="boom in forward"):
        _trainer(tmp_path, [monitor], logger=False, max_epochs=1).fit(model)
    assert monitor.errors >= 1 and monitor.last_explained_epoch == -2
    raising = FeatureVisMonitor(targets=[("logits", [0]), ("net.0.4", "channels", [1])], steps=4, on_error="raise",
                                input_shape=(1, 8, 8), value_range=(0.0, 1.0))
    model = DigitsModule(*digits_data, fail=True)
    model.net[1].eval()  # mixed train/eval flags
    with pytest.raises(RuntimeError, match="boom in forward"):
        _trainer(tmp_path, [raising], logger=False, max_epochs=1).fit(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom in forward"):
        raising.explain(_trainer(tmp_path, [raising], logger=False), model, via_module=False)
    assert_unchanged(before, model)  # the forced exception left no hook, flag, grad or buffer change behind


class FewClasses(DigitsModule):
    """The digits CNN with ``classes`` outputs (labels folded onto them); one output: a binary logit (BCE)."""

    def __init__(self, x, y, classes):
        super().__init__(x, y % max(classes, 2))
        self.net = small_cnn(num_classes=classes)
        self.classes = classes

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if self.classes == 1:
            return F.binary_cross_entropy_with_logits(out.squeeze(1), y.float())
        return F.cross_entropy(out, y)

    def validation_step(self, batch, batch_idx):
        pass


@pytest.mark.parametrize("classes, drawn", [(3, 3), (1, 2), (12, 10)], ids=["three", "binary_logit", "twelve"])
def test_default_targets_follow_the_model_classes(tmp_path, digits_data, classes, drawn, monkeypatch):
    """Default options on a model without 10 classes: one image per class (two for one binary logit, at most 10),
    at every scheduled run, and no error. The passes declared before the first run are an upper bound."""
    monkeypatch.chdir(tmp_path)  # logger=False: the grids go to ./xai/
    monitor = FeatureVisMonitor(every_n_epochs=1, steps=4)
    listed = FeatureVisMonitor(targets=["logits", ("net.0.0", "channels", [0])])  # "logits" as one set of several
    assert listed._classes_to_read and [label for label, _ in listed.target_sets] == ["logits", "net.0.0"]
    before = monitor.estimated_passes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed run warns
        warnings.filterwarnings("ignore", message=".*PNG")  # the one saying where the PNGs go
        _trainer(tmp_path, [monitor], logger=False).fit(FewClasses(*digits_data, classes))
    assert monitor.errors == 0 and monitor.last_explained_epoch == 1
    assert monitor.last_activations["logits"].shape == (drawn,)
    assert [o.name for o in dict(monitor.target_sets)["logits"]] == [f"class:{c}" for c in range(drawn)]
    assert before.gradient == 10 * 4 and before.forward == 10 + 1
    assert monitor.estimated_passes() == drawn * monitor_passes(4)
    assert len(glob.glob(str(tmp_path / "xai" / "*featvis_logits*.png"))) == 2  # both epochs


def monitor_passes(steps):
    from lightning_xai._utils import Passes

    return Passes(forward=1, gradient=steps)


def test_explicit_classes_the_model_lacks_are_an_error(tmp_path, digits_data):
    monitor = FeatureVisMonitor(targets=[("logits", range(10))], every_n_epochs=1, steps=4)
    with pytest.warns(RuntimeWarning, match=r"class index"):
        _trainer(tmp_path, [monitor], logger=False, max_epochs=1).fit(FewClasses(*digits_data, 3))
    assert monitor.errors == 1


@pytest.mark.parametrize("shape", [(1, 64), (64,)], ids=["signal", "tabular"])
def test_inputs_that_are_not_images_are_refused_at_the_sanity_check(tmp_path, shape):
    """A 1-D signal or tabular rows: a clear error before training starts, as the other image callbacks give."""
    x = torch.rand(64, *shape)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))

    class Rows(DigitsModule):
        def __init__(self):
            super().__init__(x, torch.arange(64) % 3)
            self.net = net

    with pytest.raises(MisconfigurationException, match=r"float images of shape \(N, C, H, W\)"):
        _trainer(tmp_path, [FeatureVisMonitor(steps=2)], logger=False).fit(Rows())


def test_unknown_layer_lists_valid_names(tmp_path, digits_data):
    monitor = FeatureVisMonitor(targets=[("net.features.3", "channels", range(2))])
    with pytest.raises(MisconfigurationException, match=r"one of the model's layers: net, net\.0, net\.0\.0"):
        _trainer(tmp_path, [monitor], logger=False).fit(DigitsModule(*digits_data))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(targets=[]), "Expected `targets`", id="empty"),
        pytest.param(dict(targets="classes"), "Expected `targets` to be 'logits' or", id="string"),
        pytest.param(dict(targets=[("net.0", "filters", [1])]), "Expected `targets`", id="kind"),
        pytest.param(dict(targets=[("logits", [0]), ("logits", [1])]), "distinct labels", id="duplicate"),
        pytest.param(dict(steps=0), "Expected `steps`", id="steps"),
        pytest.param(dict(param="wavelet"), "Expected `param`", id="param"),
        pytest.param(dict(input_shape=(8, 8)), "Expected `input_shape`", id="shape"),
        pytest.param(dict(every_n_epochs=0), "Expected `every_n_epochs`", id="cadence"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises((MisconfigurationException, ValueError, TypeError), match=match):
        FeatureVisMonitor(**kwargs)


def test_validate_under_inference_mode_and_fast_dev_run(tmp_path, digits_data):
    model = DigitsModule(*digits_data)
    monitor = FeatureVisMonitor(targets=("logits", range(3)), steps=4)  # a single spec is accepted too
    trainer = _trainer(tmp_path, [monitor])
    trainer.validate(model, verbose=False)
    assert monitor.last_explained_epoch == 0
    assert "xai/featvis/logits/activation" in trainer.callback_metrics
    quiet = FeatureVisMonitor(targets=[("logits", [0])], every_n_epochs=1, steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pl.Trainer(default_root_dir=tmp_path, fast_dev_run=True, callbacks=[quiet], enable_progress_bar=False,
                   enable_model_summary=False).fit(DigitsModule(*digits_data))
    assert quiet.last_explained_epoch == -2


def test_state_dict_round_trip():
    monitor = FeatureVisMonitor(targets=[("logits", [0, 1])])
    monitor.input_shape, monitor.value_range, monitor.last_explained_epoch = (1, 8, 8), (0.0, 1.0), 4
    state = monitor.state_dict()
    assert all(isinstance(v, (int, float, list, type(None))) for v in state.values())
    fresh = FeatureVisMonitor(targets=[("logits", [0, 1])])
    fresh.load_state_dict(state)
    assert fresh.input_shape == (1, 8, 8) and tuple(fresh.value_range) == (0.0, 1.0)
    assert fresh.last_explained_epoch == 4
    assert "featvis" in fresh.state_key and "logits" in fresh.state_key
