"""Work shared between callbacks (lightning_xai.callbacks._shared): the same attribution of the same probe rows at the
same model state is computed once, every figure is the one an unshared run logs, and the validation pass Lightning
runs anyway is the only pass that feeds the activation hooks."""
import contextlib

import pytest
import torch
from torch import nn

from helpers import (PACKAGES, classifier, digits_loaders, is_timing, lightning_package, read_events, small_cnn,
                     tiny_trainer)

from lightning_xai import AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ShortcutMonitor
from lightning_xai.shortcuts import ShortcutConfig
from lightning_xai import _layout
from lightning_xai._layout import CHECK_PASSES, CHECK_ROWS
from lightning_xai.attribution import get_method
from lightning_xai.callbacks import _shared as shared


class CountingNet(nn.Module):
    """:func:`small_cnn` that counts the rows of every forward pass whose input asks for gradients (saliency's
    passes; training and interventions feed inputs that do not) and of every pass under ``no_grad``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()
        self.grad_rows = 0
        self.no_grad_rows = 0
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if x.requires_grad:
            self.grad_rows += x.shape[0]
        elif not torch.is_grad_enabled():
            self.no_grad_rows += x.shape[0]
        return self.net(x)


def _stack():
    # both explain the label with saliency; the 8 attribution probes are the first rows per class of the 32
    return [AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0),
            ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=32, action="log",
                            config=ShortcutConfig(reference_samples=0, num_controls=2))]


def _fit(tmp_path, package="pytorch_lightning", share=True, epochs=2):
    lightning = lightning_package(package)
    lightning.seed_everything(0, workers=True)
    net = CountingNet()
    model = classifier(package, net=net)
    callbacks = _stack()
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, package=package, max_epochs=epochs)
    with contextlib.nullcontext() if share else shared.disabled():
        trainer.fit(model, *digits_loaders(n_train=128, n_val=64))
    return trainer, net, callbacks


@pytest.mark.parametrize("package", [pytest.param(p, id=p) for p in PACKAGES])
def test_saliency_of_shared_probe_rows_is_computed_once(tmp_path, package):
    _, net, (attribution, shortcut) = _fit(tmp_path / "shared", package)
    assert attribution.errors == shortcut.errors == 0
    assert set(map(tuple, attribution.probe_x.flatten(1).tolist())) <= set(
        map(tuple, shortcut.probe_x.flatten(1).tolist()))
    # per epoch: the 8 attribution rows once, then only the 24 shortcut rows not among them
    assert net.grad_rows == 2 * 32
    _, alone, _ = _fit(tmp_path / "alone", package, share=False)
    assert alone.grad_rows == 2 * (8 + 32)
    assert net.no_grad_rows < alone.no_grad_rows  # the prediction's forward of the 8 shared rows is reused too


def test_figures_identical_with_and_without_sharing(tmp_path):
    """Same tags, steps, alarms and images; scalars equal to float32 rounding (a shared row was computed in another
    batch, and CPU kernels may round a row differently by batch size: 6e-10 at most on these maps)."""
    runs = []
    for share in (True, False):
        trainer, _, callbacks = _fit(tmp_path / str(share), share=share)
        assert all(cb.errors == 0 for cb in callbacks)
        runs.append(read_events(trainer.logger.log_dir))
    with_sharing, without = runs
    scalars = [t for t in with_sharing.Tags()["scalars"] if t.startswith("xai/") and not is_timing(t)]
    images = [t for t in with_sharing.Tags()["images"] if t.startswith("xai/")]
    assert any("corner" in t for t in scalars) and any("attribution" in t for t in images)
    assert scalars == [t for t in without.Tags()["scalars"] if t.startswith("xai/") and not is_timing(t)]
    assert images == [t for t in without.Tags()["images"] if t.startswith("xai/")]
    for tag in scalars:
        a, b = with_sharing.Scalars(tag), without.Scalars(tag)
        assert [e.step for e in a] == [e.step for e in b], tag
        exact = tag.endswith("/alarm")
        torch.testing.assert_close(torch.tensor([e.value for e in a]), torch.tensor([e.value for e in b]),
                                   rtol=0 if exact else 1e-5, atol=0 if exact else 1e-7, equal_nan=True, msg=tag)
    for tag in images:
        a, b = with_sharing.Images(tag), without.Images(tag)
        assert len(a) == len(b), tag
        for x, y in zip(a, b):
            diff = (_decoded(x.encoded_image_string) - _decoded(y.encoded_image_string)).abs()
            assert int(diff.max()) <= 1, tag  # 8-bit levels: a rounding difference may move a pixel by one level


def _decoded(png: bytes) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype("int16"))


class _Owner:
    output_key = None
    forward = None


def _attached(tmp_path):
    """A module attached to a Trainer (the store is the trainer's), without fitting."""
    model = classifier(net=CountingNet())
    trainer = tiny_trainer(tmp_path, logger=False)
    model.trainer = trainer
    return trainer, model


def test_rows_are_matched_exactly_and_the_store_follows_the_weights(tmp_path):
    trainer, model = _attached(tmp_path)
    model.eval()
    owner, method = _Owner(), get_method("saliency")
    x = torch.rand(6, 1, 8, 8)
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    first = shared.attribute(owner, model, method, model, x[:4], target[:4])
    rows = model.net.grad_rows
    again = shared.attribute(owner, model, method, model, x, target)  # 4 rows reused, 2 computed
    assert model.net.grad_rows == rows + 2
    assert torch.equal(again[:4], first)
    # rows computed in another batch: equal up to the rounding of batch-size-dependent kernels (e.g. a GEMM's tail rows)
    torch.testing.assert_close(again, method[1](model, x, target), rtol=1e-5, atol=1e-9)
    rows = model.net.grad_rows
    shared.attribute(owner, model, method, model, x[:4], torch.tensor([9, 1, 2, 3]))  # another class for row 0
    assert model.net.grad_rows == rows + 1
    nudged = x.clone()
    nudged[1, 0, 0, 0] = torch.nextafter(nudged[1, 0, 0, 0], torch.tensor(2.0))  # one ulp: not the same row
    shared.attribute(owner, model, method, model, nudged[:2], target[:2])
    assert model.net.grad_rows == rows + 2
    with torch.no_grad():  # weights written in place: a new model state, nothing reused
        next(model.parameters()).add_(0.01)
    rows = model.net.grad_rows
    shared.attribute(owner, model, method, model, x[:4], target[:4])
    assert model.net.grad_rows == rows + 4
    other = type("Other", (), {"output_key": 0, "forward": None})()  # another logits function: its own rows
    shared.attribute(other, model, method, model, x[:4], target[:4])
    assert model.net.grad_rows == rows + 8


def test_calls_that_cannot_be_keyed_are_not_shared(tmp_path):
    trainer, model = _attached(tmp_path)
    model.eval()
    owner = _Owner()
    x, target = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    noisy = get_method(("smoothgrad", {"samples": 2, "generator": torch.Generator().manual_seed(0)}))
    for _ in range(2):  # a Generator advances as it is used: each call computes all of its rows
        shared.attribute(owner, model, noisy, model, x, target)
    assert model.net.grad_rows == 2 * 3 * 2
    rows = model.net.grad_rows
    plain = get_method("saliency")
    score = lambda out: out[:, 0]  # noqa: E731 - a callable target is not a class per row
    shared.attribute(owner, model, plain, model, x, score)
    shared.attribute(owner, model, plain, model, x, score)
    assert model.net.grad_rows == rows + 6
    detached = classifier(net=CountingNet()).eval()  # no Trainer: computed as is
    shared.attribute(owner, detached, plain, detached, x, target)
    shared.attribute(owner, detached, plain, detached, x, target)
    assert detached.net.grad_rows == 6


def test_validation_pass_is_the_only_pass_feeding_the_activation_hooks(tmp_path):
    """Every callback of the stack that needs activations reads them from the validation forward Lightning runs:
    one forward per validation batch, one hook per probed layer while it runs."""
    pl = lightning_package("pytorch_lightning")
    seen = []

    class Spy(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.calls = net.calls
            seen.append(("hooks", [len(m._forward_hooks) for m in (net.net[0][0], net.net[1][2])]))

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            seen.append(("forwards", net.calls - self.calls))

    pl.seed_everything(0)
    net = CountingNet()
    probes = LinearProbeMonitor(layers=["net.net.0.0", "net.net.1.2"], untrained_baseline=False)
    callbacks = _stack() + [probes, Spy()]
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=2)
    trainer.fit(classifier(net=net), *digits_loaders(n_train=128, n_val=64))
    assert all(cb.errors == 0 for cb in callbacks[:3])
    assert [v for k, v in seen if k == "hooks"] == [[1, 1]] * 4  # 2 epochs x 2 validation batches
    assert [v for k, v in seen if k == "forwards"] == [1] * 4


class _Rows(lightning_package("pytorch_lightning").Callback):
    """Placed before and after a callback: the rows ``net`` counted during that callback's epoch-end run."""

    def __init__(self, net, runs=None):
        self.net, self.runs = net, runs

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.runs is None:  # the one before the callback
            self.start = (self.net.no_grad_rows, self.net.grad_rows)
        else:
            before = self.runs[0].start
            self.runs[1].append((self.net.no_grad_rows - before[0], self.net.grad_rows - before[1]))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: AttributionMonitor(methods=("saliency", ("smoothgrad", {"samples": 3}),
                                                     ("integrated_gradients", {"steps": 5})),
                                            probe_samples=8, evolution_samples=0), id="attribution"),
    pytest.param(lambda: ShortcutMonitor(regions={"corner": (0, 0, 2, 2), "side": (0, 6, 8, 2)}, probe_samples=16,
                                         action="log", config=ShortcutConfig(reference_samples=0, num_controls=2)),
                 id="shortcut"),
    pytest.param(lambda: FeatureVisMonitor(targets=[("logits", (0, 3))], steps=4, every_n_epochs=1), id="featvis"),
])
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "layout-check"])
def test_declared_passes_are_the_rows_through_the_model(tmp_path, monkeypatch, make, deterministic):
    """``estimated_passes``: forwards alone and forward+backward passes per run, as the rows the model saw then
    (without deterministic algorithms, the first run's include the channels-last check's, its verdict fixed)."""
    monkeypatch.setattr(_layout, "GAIN", 1e9)
    pl = lightning_package("pytorch_lightning")
    pl.seed_everything(0)
    net = CountingNet()
    callback = make()
    runs = []
    before = _Rows(net)
    after = _Rows(net, (before, runs))
    declared = []
    spy = type("Spy", (pl.Callback,), {"on_validation_epoch_end": lambda s, t, m: declared.append(
        callback.estimated_passes(t))})()
    trainer = tiny_trainer(tmp_path, callbacks=[spy, before, callback, after], max_epochs=2,
                           deterministic=deterministic)
    with shared.disabled():
        trainer.fit(classifier(net=net), *digits_loaders(n_train=128, n_val=64))
    assert callback.errors == 0 and len(runs) == 2
    for passes, (forward_rows, gradient_rows) in zip(declared, runs):
        assert (passes.forward, passes.gradient) == (forward_rows, gradient_rows)
    forward_rows, gradient_rows = runs[-1]  # as the next run's
    assert callback.estimated_work(trainer) == pytest.approx(gradient_rows + forward_rows / 3)
    checked = 0 if deterministic else CHECK_PASSES * min(CHECK_ROWS, getattr(callback, "probe_samples", CHECK_ROWS))
    assert runs[0][0] - runs[1][0] == checked
