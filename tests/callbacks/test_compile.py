"""torch.compile: every callback works on a compiled model and logs what it logs on the uncompiled one.

Two ways users compile: ``Trainer.fit(torch.compile(module))`` (Lightning compiles the step functions) and a
LightningModule whose network is compiled (``self.net = torch.compile(net)``; layer names then contain
``_orig_mod``). A compiled graph ignores forward hooks added after it was built, so without care the probes,
projections, Grad-CAM, featvis layer objectives and token attributions would silently see nothing or the wrong
thing. The ``eager`` and ``aot_eager`` backends run dynamo without code generation (fast, and numerically the
same as eager PyTorch), so the figures must equal the uncompiled run's bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning import Callback

from helpers import (DigitsModule, TinyTextNet, digits_data, hook_count, is_timing, read_events, small_cnn,
                     tiny_trainer, trained_weights)
from lightning_xai import (AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ProjectionMonitor,
                           SampleInfluenceMonitor, ShortcutMonitor, TabularAttributionMonitor, TokenAttributionMonitor)
from lightning_xai._utils import eager_compiled, is_compiled
from lightning_xai.shortcuts import ShortcutConfig
from lightning_xai.text.synthetic import VOCAB, spurious_token_data

EPOCHS = 2
FEATURES = ["a", "b", "c", "d", "e"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Quiet(DigitsModule):
    """DigitsModule without ``self.log`` in its steps: with torch 2.13 and Lightning 2.6, dynamo fails to trace
    ``LightningModule.log`` inside a compiled ``training_step`` (``'method' object has no attribute
    '__dict__'``), with or without our callbacks."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return (self(x).argmax(1) == y).float().mean()


def _digits(net):
    train, val = digits_data(128, 32)
    return _Quiet(net), DataLoader(train, batch_size=32), DataLoader(val, batch_size=32)


def _data(kind: str) -> Tuple[nn.Module, TensorDataset, TensorDataset]:
    if kind == "digits":
        return small_cnn(), *digits_data(128, 32)
    if kind == "text":
        return (TinyTextNet(), TensorDataset(*spurious_token_data(96).tensors()),
                TensorDataset(*spurious_token_data(32, shortcut="random", seed=1).tensors()))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, len(FEATURES), generator=gen)
    ds = TensorDataset(x, (x[:, 1] > 0).long())
    net = nn.Sequential(nn.Linear(len(FEATURES), 16), nn.ReLU(), nn.Linear(16, 2))
    return net, TensorDataset(*ds[:96]), TensorDataset(*ds[96:])


# layer names are given relative to the network; "net." (+ "_orig_mod." when the network is compiled) is prefixed
CASES: Dict[str, Tuple[str, Callable[[Callable[[str], str]], Callback]]] = {
    "attribution": ("digits", lambda L: AttributionMonitor(
        methods=("saliency", ("integrated_gradients", {"steps": 4}), ("grad_cam", {"layer": L("0.3")}),
                 ("occlusion", {"window": 4, "stride": 4})), probe_samples=4, on_error="raise")),
    "probes": ("digits", lambda L: LinearProbeMonitor(layers=[L("0.3"), L("1.3")], on_error="raise")),
    "featvis": ("digits", lambda L: FeatureVisMonitor(targets=[("logits", (0, 1)), (L("0.3"), "channels", (0, 1))],
                                                      every_n_epochs=1, steps=4, min_side=8, on_error="raise")),
    "shortcut": ("digits", lambda L: ShortcutMonitor(regions={"corner": (0, 0, 2, 2)},
                                                     config=ShortcutConfig(num_controls=2), probe_samples=10,
                                                     action="log", on_error="raise")),
    "samples": ("digits", lambda L: SampleInfluenceMonitor(
        layer=L("1.3"), every_n_epochs=1, probe_samples=4, k=2, support_k=2, num_representers=2, num_suspects=4,
        num_sparse=2, max_train_samples=32, on_error="raise")),
    "projection": ("digits", lambda L: ProjectionMonitor(layers=[L("0.3"), L("1.3")], probe_samples=8,
                                                         projector=False, scatter=False, on_error="raise")),
    "text": ("text", lambda L: TokenAttributionMonitor(L("embedding"), vocab=list(VOCAB), watch_tokens=["zz"],
                                                       options={"steps": 4}, probe_samples=4, on_error="raise")),
    "tabular": ("tabular", lambda L: TabularAttributionMonitor(FEATURES, method="saliency", probe_samples=8,
                                                               on_error="raise")),
}


def _fit(tmp_path, name: str, case: str, compile_as: str, backend: str = "eager"):
    """``compile_as``: "none", "module" (Trainer.fit(torch.compile(module))) or "net" (the inner network)."""
    pl.seed_everything(0, workers=True)
    kind, make = CASES[case]
    net, train, val = _data(kind)
    prefix = "net._orig_mod." if compile_as == "net" else "net."
    callback = make(lambda layer: prefix + layer)
    if compile_as == "net":
        net = torch.compile(net, backend=backend)
    module = _Quiet(net, lr=0.02)
    fit_module = torch.compile(module, backend=backend) if compile_as == "module" else module
    trainer = tiny_trainer(tmp_path / name, callbacks=[callback], max_epochs=EPOCHS)
    trainer.fit(fit_module, DataLoader(train, batch_size=32), DataLoader(val, batch_size=32))
    return module, callback, trainer


def _figures(log_dir) -> Dict[Tuple[str, str, int], Any]:
    """``xai/`` scalars, images and texts by (kind, tag, step); ``_orig_mod.`` dropped from tags and texts."""
    acc = read_events(log_dir)
    tags = acc.Tags()
    out: Dict[Tuple[str, str, int], Any] = {}
    for kind, read, value in (("scalar", acc.Scalars, lambda e: e.value),
                              ("image", acc.Images, lambda e: e.encoded_image_string),
                              ("text", acc.Tensors,
                               lambda e: e.tensor_proto.string_val[0].decode().replace("_orig_mod.", ""))):
        for tag in tags["scalars" if kind == "scalar" else "images" if kind == "image" else "tensors"]:
            if tag.startswith("xai/"):
                for ev in read(tag):
                    out[(kind, tag.replace("_orig_mod.", ""), ev.step)] = value(ev)
    return out


@pytest.mark.parametrize("compile_as", [pytest.param("module", id="fit-compiled-module"),
                                        pytest.param("net", id="compiled-inner-net")])
@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in CASES])
def test_callback_on_compiled_model_logs_what_it_logs_uncompiled(tmp_path, case, compile_as):
    plain, _, _ = _fit(tmp_path, "plain", case, "none")
    module, callback, trainer = _fit(tmp_path, "compiled", case, compile_as)
    assert is_compiled(module)
    # compiling changed nothing in training (the eager backend runs the same kernels), so figures must match
    a, b = trained_weights(plain), {k.replace("_orig_mod.", ""): v for k, v in trained_weights(module).items()}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    expected = _figures(tmp_path / "plain" / "tb" / "version_0")
    got = _figures(tmp_path / "compiled" / "tb" / "version_0")
    assert expected and sorted(got) == sorted(expected)
    # figures that print a layer name (PCA scatters, the probe matrix, a feature-visualisation title, the
    # neighbours' feature layer) have "_orig_mod." in it when the net is compiled
    differ = sorted(key for key in expected if got[key] != expected[key]
                    and not (compile_as == "net" and key[0] == "image" and _names_a_layer(key[1]))
                    and not is_timing(key[1]))
    assert not differ, f"figures differ on the compiled model: {differ[:10]}"
    assert callback.errors == 0 and callback.last_explained_epoch == EPOCHS - 1
    assert hook_count(module) == 0
    assert torch._dynamo.eval_frame._stance.stance == "default"  # the eager stance never outlives a run


def _names_a_layer(tag: str) -> bool:
    return (tag.endswith("/pca") or tag.startswith(("xai/probe/heatmap", "xai/featvis/net.", "xai/samples/neighbours")))


def test_probe_untrained_baseline_is_untrained_on_compiled_module(tmp_path):
    """The untrained copy must not run the compiled forward, which is bound to the (training) original."""
    def run(name, compile_as):
        monitor = LinearProbeMonitor(layers=["net.1.3"], input_baseline=False, on_error="raise")
        pl.seed_everything(0, workers=True)
        module, train, val = _digits(small_cnn())
        trainer = tiny_trainer(tmp_path / name, callbacks=[monitor], max_epochs=1)
        trainer.fit(torch.compile(module, backend="aot_eager") if compile_as else module, train, val)
        return monitor.baselines["untrained/net.1.3"]

    plain, compiled = run("plain", False), run("compiled", True)
    assert compiled == pytest.approx(plain, abs=1e-6)


def test_eager_compiled_runs_hooks_and_restores_the_stance():
    net = small_cnn().eval()
    compiled = torch.compile(net, backend="aot_eager")
    x = torch.rand(3, 1, 8, 8)
    compiled(x)  # built before the hook exists
    seen = []
    handle = net[0][3].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        compiled(x)
        assert not seen  # the pitfall this guards against: the compiled graph skips a hook added later
        with torch.compiler.set_stance("eager_on_recompile"):
            with eager_compiled():
                torch.testing.assert_close(compiled(x), net(x))
            assert torch._dynamo.eval_frame._stance.stance == "eager_on_recompile"
        assert len(seen) == 2
    finally:
        handle.remove()
    assert not is_compiled(small_cnn()) and is_compiled(nn.Sequential(compiled))
