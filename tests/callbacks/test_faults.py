"""Fault injection: no explanation failure ends or hangs a fit under ``on_error="warn"``, no callback moves any
global random stream, and Lightning's true precisions either work or are refused at ``setup``.

The DDP cases run 2 gloo processes with a 60 s process-group timeout, so a hang fails the test instead of
blocking the suite.
"""
from __future__ import annotations

import json
import random
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from helpers import (DigitsModule, PACKAGES, classifier, digits_data, lightning_package, read_events, small_cnn,
                     tiny_trainer, trained_weights)
from lightning_xai import (AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ProjectionMonitor,
                           SampleInfluenceMonitor, ShortcutMonitor)
from lightning_xai.shortcuts import ShortcutConfig

needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _fit_quietly(trainer, module, train, val):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train, val)
    return [str(w.message) for w in caught]


# --------------------------------------------------------------------------- labels that are not class indices
class OddLabels(DigitsModule):
    """Trains on class labels but validates on batches whose second item is not one class index per sample."""

    def __init__(self, kind: str) -> None:
        super().__init__(small_cnn())
        self.kind = kind

    def training_step(self, batch, batch_idx):
        x, target = batch
        logits = self(x)
        if target.shape == logits.shape:  # multi-label
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float())
        return logits.logsumexp(1).mean()  # per-pixel targets: any differentiable loss will do here

    def validation_step(self, batch, batch_idx):
        x, target = batch
        self.log("val_loss", self(x).logsumexp(1).mean())


def _odd_val(kind: str, n: int) -> TensorDataset:
    _, val = digits_data(n_train=0, n_val=n)
    x, y = val.tensors
    if kind == "multilabel":  # (N, 10) one-hot, as a multi-label task gives it
        target = torch.nn.functional.one_hot(y, 10).float()
    else:  # per-pixel (N, 8, 8) masks, as a segmentation task gives it
        target = (x[:, 0] > 0.5).long()
    return TensorDataset(x, target)


@pytest.mark.parametrize("kind", ["multilabel", "per_pixel"])
@pytest.mark.parametrize("make", [
    pytest.param(lambda: AttributionMonitor(methods="saliency", probe_samples=6), id="attribution"),
    pytest.param(lambda: ProjectionMonitor(layers=["net.1.3"], probe_samples=12), id="projection"),
    pytest.param(lambda: SampleInfluenceMonitor(every_n_epochs=1, probe_samples=4, max_train_samples=64), id="samples"),
    pytest.param(lambda: ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=16, action="log",
                                         config=ShortcutConfig(num_controls=2)), id="shortcut"),
])
def test_labels_that_are_not_classes_are_ignored_with_a_warning(tmp_path, make, kind):
    train, val = _odd_val(kind, 256), _odd_val(kind, 48)  # training batches too (ShortcutMonitor reads them)
    monitor = make()
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=2)
    messages = _fit_quietly(trainer, OddLabels(kind), DataLoader(train, batch_size=32), DataLoader(val, batch_size=16))
    assert trainer.current_epoch == 2 and monitor.errors == 0
    assert monitor.last_explained_epoch == 1
    assert any("not one class index per sample" in m for m in messages)
    assert monitor.probe_y is None  # chosen without classes


# --------------------------------------------------------------------------- batches the callback cannot read
class Mapped(Dataset):
    """``fn(x, y)`` of every sample of ``base``."""

    def __init__(self, base: TensorDataset, fn) -> None:
        self.base, self.fn = base, fn

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        return self.fn(*self.base[i])


def DictBatches(base: TensorDataset) -> Dataset:
    return Mapped(base, lambda x, y: {"pixels": x, "digit": y})


class DictModule(DigitsModule):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["pixels"], batch["digit"]), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch["pixels"], batch["digit"]), batch_idx)


def test_unfamiliar_dict_batches_warn_how_to_fix_and_training_goes_on(tmp_path):
    train, val = digits_data(128, 32)
    monitor = AttributionMonitor(methods="saliency", probe_samples=4)
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=2)
    messages = _fit_quietly(trainer, DictModule(), DataLoader(DictBatches(train), batch_size=32),
                            DataLoader(DictBatches(val), batch_size=16))
    assert trainer.current_epoch == 2
    assert any("AttributionMonitor failed while reading a validation batch" in m and "batch_to_xy" in m
               and "epoch 0" in m for m in messages)


def test_a_batch_to_xy_that_raises_once_costs_one_batch(tmp_path):
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("the second batch is broken")
        return batch[0], batch[1]

    train, val = digits_data(128, 64)
    monitor = AttributionMonitor(methods="saliency", probe_samples=10, batch_to_xy=flaky)
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=2)
    messages = _fit_quietly(trainer, DigitsModule(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=16))
    assert trainer.current_epoch == 2 and monitor.last_explained_epoch == 1
    assert monitor.probe_x.shape[0] == 10  # the other batches gave the probe set
    assert sum("KeyError" in m for m in messages) == 1


def test_on_error_raise_still_raises(tmp_path):
    def broken(batch):
        raise KeyError("broken")

    train, val = digits_data(64, 32)
    monitor = AttributionMonitor(methods="saliency", batch_to_xy=broken, on_error="raise")
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=1)
    with pytest.raises(KeyError, match="broken"):
        trainer.fit(DigitsModule(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=16))


# --------------------------------------------------------------------------- do no harm: every global RNG
def _jitter(x, y):
    return x + 0.01 * (random.random() + float(np.random.rand()) + float(torch.rand(()))), y


def DrawingDataset(base: TensorDataset) -> Dataset:
    """Digits whose ``__getitem__`` draws from Python's ``random``, NumPy's and torch's global RNGs (an augmentation
    written the careless way): any extra read by a callback changes what training draws next."""
    return Mapped(base, _jitter)


class DrawingModule(DigitsModule):
    """Also draws from every global RNG in its steps, so a moved stream shows in the weights."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + 0.01 * (random.random() + float(np.random.rand())) + 0.01 * torch.rand_like(x)
        return super().training_step((x, y), batch_idx)


def _fit_drawing(tmp_path, callbacks):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    train, val = digits_data(128, 32)
    module = DrawingModule(small_cnn(dropout=0.2))
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=2, deterministic=False)
    trainer.fit(module, DataLoader(DrawingDataset(train), batch_size=32, shuffle=True),
                DataLoader(DrawingDataset(val), batch_size=16))
    return trained_weights(module), (random.random(), float(np.random.rand()), float(torch.rand(())))


def test_no_callback_moves_python_numpy_or_torch_random_streams(tmp_path):
    plain = _fit_drawing(tmp_path / "plain", [])
    callbacks = [
        SampleInfluenceMonitor(every_n_epochs=1, probe_samples=4, max_train_samples=64),  # reads training samples
        AttributionMonitor(methods=("saliency", ("smoothgrad", {"samples": 4})), probe=[0, 3, 5]),  # reads val[i]
        ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=16, action="log",
                        config=ShortcutConfig(num_controls=2)),
        LinearProbeMonitor(layers=["net.1.3"]),
        FeatureVisMonitor(every_n_epochs=1, steps=4),
    ]
    watched = _fit_drawing(tmp_path / "watched", callbacks)
    assert all(c.last_explained_epoch == 1 for c in callbacks)
    weights, draws = watched
    for k in plain[0]:
        assert torch.equal(plain[0][k], weights[k]), f"weights differ: {k}"
    assert plain[1] == draws, "a global random stream moved"


# --------------------------------------------------------------------------- precisions
ALL = [
    pytest.param(lambda: AttributionMonitor(
        methods=("saliency", ("integrated_gradients", {"steps": 4}))), id="attribution"),
    pytest.param(lambda: LinearProbeMonitor(layers=["net.1.3"]), id="probes"),
    pytest.param(lambda: ProjectionMonitor(layers=["net.1.3"]), id="projection"),
    pytest.param(lambda: FeatureVisMonitor(every_n_epochs=1, steps=4), id="featvis"),
    pytest.param(lambda: SampleInfluenceMonitor(every_n_epochs=1, probe_samples=4, max_train_samples=64), id="samples"),
    pytest.param(lambda: ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=16, action="log",
                                         config=ShortcutConfig(num_controls=2)), id="shortcut"),
]


@pytest.mark.parametrize("make", ALL)
def test_double_precision_explains_with_finite_figures(tmp_path, make):
    monitor = make()
    monitor.on_error = "raise"
    train, val = digits_data(128, 32)
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=1, precision="64-true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsModule(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=16))
    assert monitor.last_explained_epoch == 0
    acc = read_events(tmp_path / "tb" / "version_0")
    scalars = [t for t in acc.Tags()["scalars"] if t.startswith(monitor.tag()) and not t.endswith("/seconds")]
    images = [t for t in acc.Tags()["images"] if t.startswith(monitor.tag())]
    assert scalars or images
    for tag in scalars:
        values = [ev.value for ev in acc.Scalars(tag)]
        assert all(np.isfinite(v) or "separation" in tag or "gain" in tag for v in values), tag


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_half_true_precisions_are_refused_at_setup(tmp_path, precision, package):
    lightning = lightning_package(package)
    train, val = digits_data(64, 32)
    monitor = AttributionMonitor(methods="saliency")
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=1, precision=precision, package=package)
    with pytest.raises(lightning.utilities.exceptions.MisconfigurationException, match=precision):
        trainer.fit(classifier(package), DataLoader(train, batch_size=32), DataLoader(val, batch_size=16))
    assert trainer.global_step == 0  # refused before any training step


# --------------------------------------------------------------------------- DDP: a failure on one rank only
class DumpErrors(lightning_package("pytorch_lightning").Callback):
    def __init__(self, path, monitor):
        self.path, self.monitor = path, monitor

    def on_fit_end(self, trainer, pl_module):
        state = {"errors": self.monitor.errors, "explained": self.monitor.last_explained_epoch,
                 "epoch": trainer.current_epoch}
        with open(f"{self.path}/rank{trainer.global_rank}.json", "w", encoding="utf-8") as fh:
            json.dump(state, fh)


def _rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def batch_to_xy_failing_on_rank_1(batch):
    if _rank() == 1:
        raise RuntimeError("this batch_to_xy fails on rank 1 only")
    return batch[0], batch[1]


def forward_failing_on_rank_1(module, x):
    if _rank() == 1:
        raise RuntimeError("this forward fails on rank 1 only")
    return module(x)


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("make", [
    pytest.param(lambda: LinearProbeMonitor(layers=["net.1.3"], batch_to_xy=batch_to_xy_failing_on_rank_1),
                 id="probes"),  # a failing concept is dropped instead: test_probes_ddp.py
    pytest.param(lambda: AttributionMonitor(methods="saliency", probe_samples=6, forward=forward_failing_on_rank_1),
                 id="attribution"),
])
def test_a_failure_on_one_rank_is_agreed_on_and_warned_by_that_rank(tmp_path, capfd, make):
    from pytorch_lightning.strategies import DDPStrategy

    monitor = make()
    train, val = digits_data(128, 64)
    strategy = DDPStrategy(process_group_backend="gloo", start_method="spawn", timeout=timedelta(seconds=60))
    trainer = tiny_trainer(tmp_path, [monitor, DumpErrors(str(tmp_path), monitor)], max_epochs=2, logger=False,
                           devices=2, strategy=strategy)
    trainer.fit(DigitsModule(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=16))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["epoch"] for r in ranks] == [2, 2]  # both ranks trained to the end: no hang, no lost fit
    assert ranks[0]["errors"] == 0 and ranks[1]["errors"] >= 1  # the failure is rank 1's
    assert ranks[0]["explained"] == ranks[1]["explained"] == -2  # every run skipped on both ranks together
    err = capfd.readouterr().err
    assert "failed while" in err and "on rank 1" in err and "fails on rank 1 only" in err
