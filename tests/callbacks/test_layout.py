"""Channels-last explanation passes (lightning_xai._layout and the callbacks' ``channels_last``): the check accepts a
layout-free convolutional model that runs faster so, and refuses one that fails, answers differently or is not
faster; explanations are the same numbers either way, laid out as always; a model that depends on its layout is
explained in its own. Fits that test a path fix the timing's verdict (``GAIN``), so no test depends on speed."""
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import classifier, colour_images, hook_count, keep_results, small_cnn, tiny_trainer, trained_weights

from lightning_xai import AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ShortcutMonitor
from lightning_xai import _layout
from lightning_xai._layout import CHECK_PASSES, CHECK_ROWS, agrees, channels_last, choose, eligible
from lightning_xai.attribution import integrated_gradients, saliency
from lightning_xai.shortcuts import ShortcutConfig


class ViewNet(nn.Module):
    """Flattens with ``view`` after a convolution: fails on a channels-last input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).view(x.shape[0], -1))


class StrideNet(small_cnn().__class__):
    """Answers differently when its input is channels-last (reads the memory, not the values); 3 channels."""

    def __init__(self) -> None:
        super().__init__(*small_cnn(in_channels=3).children())

    def forward(self, x):
        out = super().forward(x)
        return out + 5.0 * float(x.stride(1) == 1)


class LayoutSpy(nn.Module):
    """:func:`small_cnn` on 3 channels, noting (asks for gradients, channels-last) of every input."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn(in_channels=3)
        self.seen = []

    def forward(self, x):
        self.seen.append((x.requires_grad, x.is_contiguous(memory_format=torch.channels_last)
                          and not x.is_contiguous()))
        return self.net(x)


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_same_values_gradient_in_default_layout(channels):
    x = torch.rand(3, channels, 5, 4, requires_grad=True)
    y = channels_last(x)
    assert torch.equal(y, x)
    # a convolution keeps the layout (with one channel too, whose NCHW strides are already channels-last)
    out = nn.Conv2d(channels, 4, 3, padding=1)(y)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    weight = torch.arange(3 * channels * 20.0).view(x.shape)
    (grad,) = torch.autograd.grad((y * weight).sum(), x)
    assert grad.is_contiguous() and torch.equal(grad, weight)


def test_eligible_needs_a_conv2d_model_and_4d_float_cpu_inputs():
    cnn, mlp = small_cnn(), nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(2, 1, 8, 8)
    assert eligible(cnn, x)
    assert not eligible(mlp, x)
    assert not eligible(cnn, x.flatten(1))
    assert not eligible(cnn, x.long())
    assert not eligible(lambda z: cnn(z), x)  # no module to look into


def test_agrees_on_a_plain_cnn_and_refuses_layout_dependent_ones():
    x, net = torch.rand(6, 1, 8, 8), small_cnn().eval()
    assert agrees(net, x)
    assert agrees(lambda z: {"logits": net(z), "n": torch.tensor(z.shape[0])}, x)
    assert not agrees(lambda z: small_cnn().eval()(z), x)  # another model each call: different answers
    assert not agrees(ViewNet().eval(), x)  # raises on channels-last
    assert not agrees(StrideNet().eval(), x.repeat(1, 3, 1, 1))  # a different answer
    assert not agrees(lambda z: 1.0, x)  # nothing to compare


def test_agrees_runs_check_rows_both_ways_without_gradients():
    seen = []
    torch.manual_seed(0)
    net = small_cnn(in_channels=3).eval()

    def run(z):
        seen.append((z.shape[0], torch.is_grad_enabled(), z.is_contiguous()))
        return net(z)

    assert agrees(run, torch.rand(CHECK_ROWS + 5, 3, 8, 8))
    assert seen == [(CHECK_ROWS, False, True), (CHECK_ROWS, False, False)]


def _sleeper(native: float, fast: float):
    """A model taking ``native`` seconds on NCHW inputs and ``fast`` on channels-last ones; counts its calls."""
    calls = []

    def run(z):
        calls.append(z.shape[0])
        time.sleep(native if z.is_contiguous() else fast)
        return z.sum((1, 2, 3))

    return run, calls


def test_choose_takes_channels_last_only_when_faster():
    x = torch.rand(20, 3, 4, 4)
    run, calls = _sleeper(native=0.03, fast=0.0)
    assert choose(run, x)
    assert calls == [CHECK_ROWS] * CHECK_PASSES
    run, calls = _sleeper(native=0.0, fast=0.03)
    assert not choose(run, x)
    assert len(calls) == CHECK_PASSES
    assert not choose(ViewNet().eval(), x[:, :1].repeat(1, 1, 2, 2))  # refused before any timing


@pytest.mark.parametrize("method", [saliency, lambda f, x, t: integrated_gradients(f, x, t, steps=8)])
def test_gradient_maps_are_the_same_numbers_in_either_layout(method):
    torch.manual_seed(0)
    net = small_cnn().eval()
    x, target = torch.rand(5, 1, 8, 8), torch.arange(5)
    plain = method(net, x, target)
    fast = method(lambda z: net(channels_last(z)), x, target)
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)


def _fit(tmp_path, callbacks, net, epochs=1, deterministic=False):
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=epochs, logger=False,
                           deterministic=deterministic)
    loader = torch.utils.data.DataLoader
    trainer.fit(classifier(net=net), loader(colour_images(64, 0), batch_size=32, shuffle=True),
                loader(colour_images(32, 1), batch_size=32))
    return trainer


@pytest.fixture
def fast_wins(monkeypatch):
    """The timing's verdict fixed to "faster" (any time under 1e9 x the default layout's)."""
    monkeypatch.setattr(_layout, "GAIN", 1e9)


def test_default_explanation_passes_run_channels_last(tmp_path, fast_wins):
    spy = LayoutSpy()
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0)
    kept = keep_results(monitor)
    _fit(tmp_path, [monitor], spy)
    assert monitor.errors == 0 and list(monitor._layouts.values()) == [True]
    grads = [fast for wants_grad, fast in spy.seen if wants_grad]
    assert grads and all(grads)  # every saliency pass
    assert not all(fast for _, fast in spy.seen)  # training and Lightning's validation keep the loader's layout
    assert kept and kept[-1]["attr/saliency"].is_contiguous()


def test_channels_last_passes_leave_training_bit_identical(tmp_path, fast_wins):
    """No harm on the channels-last path: the same weights as a fit without callbacks (the shuffling loader reads
    the global RNG, so a drawn number would show too), no hook left, every callback taking channels-last."""
    def run(name, callbacks):
        torch.manual_seed(0)
        module = classifier(net=small_cnn(in_channels=3))
        trainer = tiny_trainer(tmp_path / name, callbacks=callbacks, max_epochs=2, logger=False, deterministic=False)
        torch.manual_seed(1)
        loader = torch.utils.data.DataLoader
        trainer.fit(module, loader(colour_images(64, 0), batch_size=16, shuffle=True),
                    loader(colour_images(32, 1), batch_size=16))
        return module

    stack = [AttributionMonitor(methods=("saliency", "grad_cam"), probe_samples=8, evolution_samples=0),
             ShortcutMonitor(regions={"corner": (0, 0, 4, 4)}, probe_samples=16, action="log",
                             config=ShortcutConfig(reference_samples=0, num_controls=2)),
             FeatureVisMonitor(targets=[("logits", (0, 3))], steps=3, every_n_epochs=1),
             LinearProbeMonitor(layers=["net.0.2"])]
    plain, explained = run("plain", []), run("stack", stack)
    assert all(cb.errors == 0 and list(cb._layouts.values()) == [True] for cb in stack)
    a, b = trained_weights(plain), trained_weights(explained)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert hook_count(explained) == 0 and explained.training
    # the model itself keeps its layout: only the passes' inputs are converted
    assert all(p.is_contiguous() and not (p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last)
                                          and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1)
               for p in explained.parameters())


def test_a_slower_layout_is_not_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(_layout, "GAIN", 0.0)  # no time is under 0 x the default layout's
    spy = LayoutSpy()
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0)
    _fit(tmp_path, [monitor], spy)
    assert monitor.errors == 0 and list(monitor._layouts.values()) == [False]
    assert not any(fast for wants_grad, fast in spy.seen if wants_grad)


def test_deterministic_algorithms_keep_the_models_layout(tmp_path, fast_wins):
    spy = LayoutSpy()
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0)
    _fit(tmp_path, [monitor], spy, deterministic=True)
    assert monitor.errors == 0 and monitor._layouts == {}
    assert not any(fast for _, fast in spy.seen)  # no check either: test_shared_work counts the rows


def test_a_checkpoints_verdict_is_kept_and_only_agreement_rechecked(monkeypatch, nondeterministic):
    monitor = AttributionMonitor(methods=("saliency",))
    net, x = small_cnn(in_channels=3).eval(), torch.rand(20, 3, 16, 16)
    monitor._layout_speed = {((3, 16, 16), "torch.float32"): True}
    state = monitor.state_dict()
    assert state["channels_last"] == [[[3, 16, 16], "torch.float32", True]]
    resumed = AttributionMonitor(methods=("saliency",))
    resumed.load_state_dict(state)

    def no_timing(*args):
        raise AssertionError("a kept verdict is not timed again")

    monkeypatch.setattr(_layout, "choose", no_timing)
    calls = []
    run = lambda z: calls.append(z.shape[0]) or net(z)  # noqa: E731
    assert resumed.layout_check_passes(net, (3, 16, 16), [20]).forward == 2 * CHECK_ROWS
    assert resumed._use_channels_last(net, run, x)
    assert calls == [CHECK_ROWS, CHECK_ROWS]  # the comparison only
    assert resumed.layout_check_passes(net, (3, 16, 16), [20]).forward == 0  # decided for this fit
    assert not resumed._use_channels_last(ViewNet3(), lambda z: ViewNet3()(z), x)  # agreement still checked
    resumed._layout_speed[((3, 16, 16), "torch.float32")] = False
    resumed._layouts = {}
    assert resumed.layout_check_passes(net, (3, 16, 16), [20]).forward == 0
    assert not resumed._use_channels_last(net, run, x) and calls == [CHECK_ROWS, CHECK_ROWS]


def test_channels_last_false_and_auto_explain_alike(tmp_path, fast_wins):
    results = {}
    for mode in ("auto", False):
        torch.manual_seed(0)
        monitor = AttributionMonitor(methods=("saliency", ("integrated_gradients", {"steps": 8}), "grad_cam"),
                                     probe_samples=8, evolution_samples=0, channels_last=mode)
        kept = keep_results(monitor)
        _fit(tmp_path / str(mode), [monitor], small_cnn(in_channels=3))
        assert monitor.errors == 0 and len(kept) == 1
        assert list(monitor._layouts.values()) == ([True] if mode == "auto" else [])
        results[mode] = kept[0]
    for key, value in results[False].items():
        if value.is_floating_point():
            torch.testing.assert_close(results["auto"][key], value, rtol=1e-3, atol=1e-5, msg=key)
        else:
            assert torch.equal(results["auto"][key], value), key


class ViewNet3(ViewNet):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 16 * 16, 10)


@pytest.mark.parametrize("make", [
    lambda: AttributionMonitor(methods=("saliency", "grad_cam"), probe_samples=8, evolution_samples=0,
                               on_error="raise"),
    lambda: ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=16, action="log", on_error="raise",
                            config=ShortcutConfig(reference_samples=0, num_controls=2)),
    lambda: FeatureVisMonitor(targets=[("logits", (0, 3))], steps=3, on_error="raise"),
    lambda: LinearProbeMonitor(layers=["net.head"], on_error="raise"),  # the view runs before it
], ids=["attribution", "shortcut", "featvis", "probes"])
def test_a_layout_dependent_model_is_explained_in_its_own_layout(tmp_path, fast_wins, make):
    monitor = make()
    _fit(tmp_path, [monitor], ViewNet3())  # would raise in channels-last (on_error="raise")
    assert monitor.errors == 0
    assert list(monitor._layouts.values()) == [False]


@pytest.mark.parametrize("make", [
    lambda: ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=16, action="log", on_error="raise",
                            config=ShortcutConfig(reference_samples=0, num_controls=2)),
    lambda: FeatureVisMonitor(targets=[("logits", (0, 3))], steps=3, on_error="raise"),
    lambda: LinearProbeMonitor(layers=["net.net.0.2"], on_error="raise"),
], ids=["shortcut", "featvis", "probes"])
def test_every_image_callback_takes_channels_last(tmp_path, fast_wins, make):
    spy = LayoutSpy()
    spy.net = small_cnn(in_channels=3)
    monitor = make()
    _fit(tmp_path, [monitor], spy)
    assert monitor.errors == 0 and list(monitor._layouts.values()) == [True]


def test_channels_last_true_skips_the_check_and_fails_like_the_model(tmp_path):
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0, channels_last=True)
    with pytest.warns(RuntimeWarning, match="view size is not compatible"):
        _fit(tmp_path, [monitor], ViewNet3())
    assert monitor.errors == 1 and monitor._layouts == {}
