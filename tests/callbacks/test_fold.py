"""BatchNorm folded into the convolution before it (lightning_xai._fold and the callbacks' ``fold_batchnorm``): the
folded copy computes the model's function and input gradients; it folds only pairs nothing else can see; it never
changes the model (not even what its forward writes on ``self`` while traced); it follows the model's weights as it
trains; and the callbacks use it only where their passes need the model's output alone, and only when it agrees
with the model on the inputs they explain, checked in every run."""
import collections
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (assert_unchanged, classifier, colour_images, hook_count, keep_results, lightning_package, snapshot,
                     small_cnn, tiny_trainer, trained_weights)

from lightning_xai import AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ShortcutMonitor
from lightning_xai import _fold
from lightning_xai._fold import AGREE_PASSES, agrees, candidates, fold
from lightning_xai._layout import CHECK_PASSES, CHECK_ROWS
from lightning_xai.attribution import integrated_gradients, saliency
from lightning_xai.shortcuts import ShortcutConfig


def _trained_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so that folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class Block(nn.Module):
    """A residual block written with attributes, as ResNets are: conv1/bn1, conv2/bn2, and a shortcut."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class Recorder(ResNetLike):
    """Writes on ``self`` in its forward: its last features, and a list of calls."""

    def __init__(self) -> None:
        super().__init__()
        self.features = None
        self.calls = []

    def forward(self, x):
        h = self.block(self.stem(x))
        self.features = h
        self.calls.append(1)
        return self.head(h.mean((2, 3)))


class Branchy(ResNetLike):
    """Control flow on the values: not traceable."""

    def forward(self, x):
        if x.sum() > 0:
            return super().forward(x)
        return super().forward(-x)


def test_folded_model_computes_the_same_logits_and_input_gradients():
    torch.manual_seed(0)
    for model, shape in ((_trained_stats(small_cnn(in_channels=3)), (5, 3, 8, 8)),
                         (_trained_stats(ResNetLike()), (5, 3, 8, 8))):
        folded = fold(model)
        assert folded is not None
        x, target = torch.rand(*shape), torch.arange(5)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
        for method in (saliency, lambda f, z, t: integrated_gradients(f, z, t, steps=8)):
            torch.testing.assert_close(method(folded, x, target), method(model, x, target), rtol=1e-4, atol=1e-6)


def test_fold_replaces_each_pair_and_keeps_everything_else():
    model = _trained_stats(ResNetLike())
    folded = fold(model)
    # the stem's pair and both of the block's; the shortcut addition and the head are left as they are
    assert len(folded.pairs) == 3
    kinds = [type(m) for _, m in folded.module.named_modules()]
    assert nn.BatchNorm2d not in kinds and nn.Linear in kinds
    assert all(p.requires_grad is False for p in folded.module._xai_folded_0.parameters())
    convs = {id(model.stem[0]), id(model.block.conv1), id(model.block.conv2)}
    assert {id(conv) for _, conv, _ in folded.pairs} == convs
    assert folded.module.head.weight is model.head.weight  # the model's tensors, shared


def test_fold_never_changes_the_model_even_what_its_forward_writes_on_self():
    torch.manual_seed(0)
    model = _trained_stats(Recorder()).train()  # tracing happens in eval mode whatever the model's flags
    before, calls = snapshot(model), model.calls
    folded = fold(model)
    assert folded is not None
    assert_unchanged(before, model)
    assert model.features is None and model.calls is calls and calls == []  # no tracing proxy leaked
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert model.calls == [1]  # the model's own call; the folded one recorded on its shadow


class Hoarder(ResNetLike):
    """Writes what it computes into every kind of container, a namespace and a tensor attribute, and prints."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = collections.deque()
        self.by_key = collections.defaultdict(list)
        self.nested = {"calls": [[]]}
        self.holder = types.SimpleNamespace(last=None)
        self.counter = torch.zeros(())

    def forward(self, x):
        h = self.block(self.stem(x))
        self.queue.append(h)
        self.by_key["h"].append(h)
        self.nested["calls"][0].append(h)
        self.holder.last = h
        self.counter += 1
        print("forward of", h)
        return self.head(h.mean((2, 3)))


def test_what_the_forward_writes_while_traced_never_reaches_the_model(capsys):
    model = _trained_stats(Hoarder())
    folded = fold(model)
    assert folded is not None and capsys.readouterr().out == ""  # the trace's print is not the model's
    assert not model.queue and not model.by_key and model.nested == {"calls": [[]]} and model.holder.last is None
    assert model.counter.item() == 0
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(model.queue) == 1 and isinstance(model.queue[0], torch.Tensor) and model.counter.item() == 1


def test_tracing_a_lightning_module_never_reaches_its_trainer():
    class Touched:
        """A stand-in trainer that notes every attribute asked of it."""

        def __init__(self):
            self.__dict__["asked"] = []

        def __getattr__(self, name):
            self.asked.append(name)
            raise AttributeError(name)

    class Logging(type(classifier())):
        def forward(self, x):
            self.log("traced", 1.0)  # reaches the trainer's logger connector when attached
            return self.net(x)

    module = Logging(_trained_stats(small_cnn(in_channels=3)))
    trainer = module.__dict__["_trainer"] = Touched()
    assert fold(module) is not None
    assert trainer.asked == []


def test_models_whose_hooks_or_buffers_a_copy_would_miss_are_not_folded():
    class Counting(ResNetLike):  # writes into a buffer of its own in every forward
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.seen += 1
            return super().forward(x)

    counting = _trained_stats(Counting())
    assert fold(counting) is None and counting.seen.item() == 0  # restored after the trace
    backward = _trained_stats(ResNetLike())  # guided-backprop style: changes the input gradients alone
    backward.stem[2].register_full_backward_hook(lambda m, gin, gout: (gin[0].clamp_min(0),))
    assert fold(backward) is None
    pre = _trained_stats(ResNetLike())  # recomputes what the layer computes (as pruning and weight_norm do)
    pre.head.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    assert fold(pre) is None


def test_tracing_a_forward_that_draws_random_numbers_leaves_the_generators_alone():
    class Noisy(ResNetLike):
        def forward(self, x):
            return super().forward(x) + 0.0 * torch.rand(1)  # a fixed shape: drawn while traced

    model, state = _trained_stats(Noisy()), torch.get_rng_state()
    assert fold(model) is not None
    assert torch.equal(torch.get_rng_state(), state)


def test_pairs_another_layer_can_see_are_not_folded():
    class Shared(nn.Module):  # the convolution's output goes to the BatchNorm and to the head
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv(x)
            return (self.bn(h) + h).mean((2, 3))

    assert fold(_trained_stats(Shared())) is None
    hooked = _trained_stats(small_cnn(in_channels=3))
    handle = hooked[0][1].register_forward_hook(lambda m, i, o: None)
    assert candidates(hooked) is False and fold(hooked) is None
    handle.remove()
    no_stats = small_cnn(in_channels=3)
    no_stats[0][1] = nn.BatchNorm2d(8, track_running_stats=False)  # normalises each batch, even in eval mode
    assert fold(no_stats) is None
    assert fold(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))) is None  # not after a convolution
    assert fold(_trained_stats(Branchy())) is None  # does not trace


def test_conv1d_and_conv3d_pairs_fold():
    torch.manual_seed(0)
    for conv, norm, shape in ((nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), (3, 2, 9)),
                              (nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), (3, 2, 5, 5, 5))):
        model = _trained_stats(nn.Sequential(conv, norm, nn.ReLU()))
        folded = fold(model)
        x = torch.randn(*shape)
        assert len(folded.pairs) == 1
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_refresh_follows_training_and_a_replaced_parameter_needs_a_new_fold():
    model = _trained_stats(small_cnn(in_channels=3))
    folded, x = fold(model), torch.rand(4, 3, 8, 8)
    with torch.no_grad():  # what an optimiser step and a BatchNorm update do: in place
        model[0][0].weight.mul_(1.5)
        model[0][1].running_var.mul_(2.0)
    assert folded.refresh()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    model[0][0].weight = nn.Parameter(torch.randn_like(model[0][0].weight))
    assert not folded.current() and not folded.refresh()
    model = _trained_stats(small_cnn(in_channels=3))
    folded = fold(model)
    model[1][2] = nn.Linear(64, 32)  # a layer replaced by a new module under the same name
    assert not folded.current()


def test_a_fold_made_under_inference_mode_refreshes_and_differentiates_outside_it():
    model = _trained_stats(ResNetLike())
    with torch.inference_mode():
        folded = fold(model)
        assert folded.refresh()
    assert folded.refresh()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(folded(x).sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(model(x).sum(), x)[0], rtol=1e-4, atol=1e-6)


def test_agrees_runs_check_rows_once_each_way_with_gradients():
    model = _trained_stats(small_cnn(in_channels=3))
    folded, seen = fold(model), []

    def spy(run):
        def inner(z):
            seen.append((z.shape[0], torch.is_grad_enabled()))
            return run(z)
        return inner

    assert agrees(spy(model), spy(folded), torch.rand(CHECK_ROWS + 4, 3, 8, 8))
    assert seen == [(CHECK_ROWS, True)] * AGREE_PASSES  # forward+backward: the input gradients are compared too
    assert not agrees(model, lambda z: folded(z) + 1.0, torch.rand(4, 3, 8, 8))
    assert not agrees(model, lambda z: 1 / 0, torch.rand(4, 3, 8, 8))


# --------------------------------------------------------------------------- the callbacks
def _fit(tmp_path, callbacks, make_net, epochs=1, deterministic=False, seed=0):
    """A fit of ``classifier(net=make_net())`` from seeded weights and a seeded loader order."""
    torch.manual_seed(seed)
    module = classifier(net=make_net())
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=epochs, logger=False,
                           deterministic=deterministic)
    loader = torch.utils.data.DataLoader
    torch.manual_seed(seed + 1)
    trainer.fit(module, loader(colour_images(64, 0), batch_size=16, shuffle=True),
                loader(colour_images(32, 1), batch_size=16))
    return module


@pytest.fixture
def verdicts(monkeypatch):
    """Every folding check's answer, in order."""
    seen = []
    check = _fold.agrees

    def spy(*args, **kwargs):
        seen.append(check(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(_fold, "agrees", spy)
    return seen


def test_folded_and_unfolded_explanations_agree(tmp_path, verdicts):
    results = {}
    for mode in ("auto", False):
        monitor = AttributionMonitor(methods=("saliency", ("smoothgrad", {"samples": 4}),
                                              ("integrated_gradients", {"steps": 8})),
                                     probe_samples=8, evolution_samples=0, fold_batchnorm=mode, channels_last=False)
        kept = keep_results(monitor)
        _fit(tmp_path / str(mode), [monitor], lambda: small_cnn(in_channels=3), epochs=2)
        assert monitor.errors == 0 and len(kept) == 2
        results[mode] = kept[-1]
    assert verdicts == [True, True]  # a check in each run of the "auto" fit
    for key, value in results[False].items():
        if value.is_floating_point():
            torch.testing.assert_close(results["auto"][key], value, rtol=1e-3, atol=1e-5, msg=key)
        else:
            assert torch.equal(results["auto"][key], value), key


def test_folding_leaves_training_bit_identical(tmp_path, verdicts):
    """No harm: the same weights as a fit without callbacks, no hook left, train mode back, for a model whose
    forward writes on ``self``; every callback that can fold did."""
    def stack():
        return [AttributionMonitor(probe_samples=8, evolution_samples=0, methods=("saliency",)),
                ShortcutMonitor(regions={"corner": (0, 0, 4, 4)}, probe_samples=16, action="log",
                                config=ShortcutConfig(reference_samples=0, num_controls=2)),
                FeatureVisMonitor(targets=[("logits", (0, 3))], steps=3, every_n_epochs=1),
                LinearProbeMonitor(layers=["net.block"])]

    plain = _fit(tmp_path / "plain", [], Recorder, epochs=2)
    callbacks = stack()
    explained = _fit(tmp_path / "stack", callbacks, Recorder, epochs=2)
    assert all(cb.errors == 0 for cb in callbacks)  # LinearProbeMonitor's hook on the block never saw a tracing
    assert verdicts == [True] * 6  # Attribution, Shortcut, FeatureVis: in each of the two runs
    a, b = trained_weights(plain), trained_weights(explained)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert hook_count(explained) == 0 and explained.training
    # what the forward wrote on self while traced stayed on the shadow
    assert isinstance(explained.net.features, torch.Tensor) and set(explained.net.calls) == {1}


@pytest.mark.parametrize("make, folds", [
    (lambda: AttributionMonitor(methods=("saliency", "grad_cam"), probe_samples=8, evolution_samples=0), False),
    (lambda: AttributionMonitor(methods=(lambda f, x, t: saliency(f, x, t),), probe_samples=8,
                                evolution_samples=0), False),
    (lambda: FeatureVisMonitor(targets=[("net.stem", "channels", (0, 1))], steps=3), False),
    (lambda: FeatureVisMonitor(targets=[("logits", (0, 1))], steps=3), True),
    (lambda: ShortcutMonitor(regions={"corner": (0, 0, 4, 4)}, probe_samples=16, action="log", method="grad_cam",
                             config=ShortcutConfig(reference_samples=0, num_controls=2)), False),
    (lambda: AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0,
                                forward=lambda m, x: m(x)), False),
], ids=["grad-cam", "user-method", "layer-objective", "class-objective", "shortcut-grad-cam", "user-forward"])
def test_only_passes_that_need_the_output_alone_fold(tmp_path, verdicts, make, folds):
    monitor = make()
    monitor.on_error = "raise"
    _fit(tmp_path, [monitor], ResNetLike)
    assert monitor.errors == 0
    assert verdicts == ([True] if folds else [])


def test_deterministic_algorithms_and_false_do_not_fold_and_true_does(tmp_path, verdicts):
    make = lambda **kw: AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0,  # noqa: E731
                                           **kw)
    _fit(tmp_path / "det", [make()], ResNetLike, deterministic=True)
    _fit(tmp_path / "off", [make(fold_batchnorm=False)], ResNetLike)
    assert verdicts == []
    _fit(tmp_path / "on", [make(fold_batchnorm=True)], ResNetLike, deterministic=True)
    assert verdicts == [True]


class Hooked(ResNetLike):
    """A forward hook rescales the head's output: the traced copy does not run it, so the check must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.head.register_forward_hook(lambda m, args, out: out * 3.0)


def test_a_copy_that_differs_from_the_model_is_refused_and_the_model_explained(tmp_path, verdicts):
    results = {}
    for mode in ("auto", False):
        monitor = AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0, fold_batchnorm=mode,
                                     on_error="raise")
        kept = keep_results(monitor)
        _fit(tmp_path / str(mode), [monitor], Hooked)
        results[mode] = kept[-1]["attr/saliency"]
    assert verdicts == [False]
    torch.testing.assert_close(results["auto"], results[False], rtol=1e-4, atol=1e-6)


def test_declared_passes_count_the_folding_check_in_every_run(tmp_path, monkeypatch):
    """Every run declares the folding check's passes and the first one the layout check's forwards, as rows through
    the model's head (the folded copy calls a shadow of it, holding the same weight)."""
    from lightning_xai import _layout
    monkeypatch.setattr(_layout, "GAIN", 1e9)
    heads, rows = [], []
    linear = nn.Linear.forward

    def counting(self, x):
        if any(self.weight is w for w in heads):
            rows.append((x.shape[0], x.requires_grad))
        return linear(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counting)

    def make():
        net = ResNetLike()
        heads.append(net.head.weight)
        return net

    monitor = AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0)
    declared, seen = [], []
    pl = lightning_package("pytorch_lightning")

    class Before(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            declared.append(monitor.estimated_passes(trainer))
            rows.clear()

    class After(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append((sum(n for n, g in rows if not g), sum(n for n, g in rows if g)))

    _fit(tmp_path, [Before(), monitor, After()], make, epochs=2)
    assert monitor.errors == 0 and len(seen) == 2
    for passes, (forward_rows, gradient_rows) in zip(declared, seen):
        assert (passes.forward, passes.gradient) == (forward_rows, gradient_rows)
    assert seen[0][0] - seen[1][0] == CHECK_PASSES * min(CHECK_ROWS, 8)  # the layout check, once; 8 probe rows
    assert seen[0][1] == seen[1][1] == (1 + AGREE_PASSES) * 8  # saliency and the folding check, in every run


class Scaled(ResNetLike):
    """Its forward reads a plain attribute, which training changes: a traced copy keeps the value it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def forward(self, x):
        return super().forward(x) * self.scale


def test_a_copy_gone_stale_between_runs_is_caught_by_the_next_runs_check(tmp_path, verdicts):
    pl = lightning_package("pytorch_lightning")

    class Rescale(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.net.scale = 1.0 + trainer.current_epoch

    results = {}
    for mode in ("auto", False):
        monitor = AttributionMonitor(methods=("saliency",), probe_samples=8, evolution_samples=0, fold_batchnorm=mode,
                                     on_error="raise")
        kept = keep_results(monitor)
        _fit(tmp_path / str(mode), [Rescale(), monitor], Scaled, epochs=2)
        results[mode] = kept[-1]["attr/saliency"]
    assert verdicts == [True, False]  # the second run's copy still multiplies by 1
    torch.testing.assert_close(results["auto"], results[False], rtol=1e-4, atol=1e-6)


def test_a_float64_model_folds_and_takes_float32_inputs(nondeterministic):
    model, x = _trained_stats(ResNetLike()).double(), torch.rand(4, 3, 8, 8)
    monitor = AttributionMonitor(methods=("saliency",), channels_last=False)
    fn = monitor.logits_fn(model, x)
    assert list(monitor._fold_agrees.values()) == [True]
    out = fn(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, model(x.double()), rtol=1e-10, atol=1e-10)
