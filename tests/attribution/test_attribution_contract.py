"""Attribution cores, layer 3 and API: no side effects (also after a forced exception), grad/inference
contexts, target forms, argument errors, the method registry, the Captum adapter and import isolation."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers import assert_unchanged, small_cnn, snapshot
from lightning_xai.attribution import (
    METHODS,
    CaptumMethod,
    from_captum,
    get_method,
    grad_cam,
    input_x_gradient,
    integrated_gradients,
    is_signed,
    lime,
    occlusion,
    saliency,
    smoothgrad,
)


@pytest.fixture
def batch():
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _captum_saliency(model, inputs, target=None, **options):
    from captum.attr import Saliency

    return from_captum(Saliency(model))(model, inputs, target, **options)


def _captum_noise_tunnel(model, inputs, target=None, **options):
    from captum.attr import NoiseTunnel, Saliency

    return from_captum(NoiseTunnel(Saliency(model)), nt_samples=3, stdevs=0.1)(model, inputs, target, **options)


# every method, with options that make it run at least two forward passes on a 4-sample batch
METHOD_CASES = [
    pytest.param(saliency, {"batch_size": 2}, id="saliency"),
    pytest.param(input_x_gradient, {"batch_size": 2}, id="input_x_gradient"),
    pytest.param(smoothgrad, {"samples": 3, "batch_size": 4}, id="smoothgrad"),
    pytest.param(integrated_gradients, {"steps": 4, "internal_batch_size": 4, "return_delta": True}, id="ig"),
    pytest.param(integrated_gradients, {"steps": 4, "baseline": "uniform"}, id="ig-uniform"),
    pytest.param(occlusion, {"window": 4, "stride": 4, "perturbations_per_eval": 1}, id="occlusion"),
    pytest.param(grad_cam, {"layer": "0.3", "batch_size": 2}, id="grad_cam"),
    pytest.param(lime, {"samples": 8, "grid": (2, 2), "batch_size": 4}, id="lime"),
    pytest.param(_captum_saliency, {}, id="captum-saliency"),
    pytest.param(_captum_noise_tunnel, {}, id="captum-noise-tunnel"),
]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------- hygiene
@pytest.mark.parametrize("fn,options", METHOD_CASES)
@pytest.mark.parametrize("target", [pytest.param(None, id="predicted"), pytest.param(3, id="int")])
def test_no_side_effects(cnn, batch, fn, options, target):
    for p in list(cnn.parameters())[:2]:
        p.grad = torch.ones_like(p)  # existing grads must survive untouched
    before = snapshot(cnn)
    x = batch.clone()
    out = _first(fn(cnn, x, target, **options))
    assert_unchanged(before, cnn)
    assert torch.equal(x, batch) and not x.requires_grad
    assert not out.requires_grad and out.grad_fn is None
    assert out.shape == ((4, 1, 8, 8))


@pytest.mark.parametrize("fn,options", METHOD_CASES)
def test_no_side_effects_with_input_requiring_grad_and_mixed_modes(fn, options, batch):
    torch.manual_seed(0)
    model = small_cnn(batchnorm=False, dropout=0.0)
    model.train()
    model[1].eval()  # mixed flags: the core must neither force eval nor train
    before = snapshot(model)
    x = batch.clone().requires_grad_(True)
    _first(fn(model, x, 0, **options))
    assert_unchanged(before, model)
    assert x.requires_grad and x.grad is None and torch.equal(x.detach(), batch)


class Raising(nn.Module):
    """Passes inputs through; raises on call number ``fail_on`` (counting from 1)."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fail_on, self.calls = fail_on, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("forced failure")
        return x


@pytest.mark.parametrize("fn,options", METHOD_CASES)
@pytest.mark.parametrize("where", [pytest.param("head", id="raise-in-head"), pytest.param("middle", id="raise-mid")])
def test_no_side_effects_after_forced_exception(fn, options, batch, where):
    torch.manual_seed(0)
    net = small_cnn().eval()
    if where == "head":
        model = nn.Sequential(net, Raising(fail_on=2))
    else:  # inside the features, after the Grad-CAM layer's input conv
        net[0].append(Raising(fail_on=2))
        model = net
    if "layer" in options:
        options = {**options, "layer": net[0][3]}
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="forced failure"):
        fn(model, batch.clone(), None, **options)
    assert_unchanged(before, model)


@pytest.mark.parametrize("fn,options", METHOD_CASES)
@pytest.mark.parametrize("context", [pytest.param("no_grad", id="no_grad"),
                                     pytest.param("inference", id="inference_mode")])
def test_grad_contexts(cnn, batch, fn, options, context):
    ref = _first(fn(cnn, batch, 3, **options))
    before = snapshot(cnn)
    if context == "no_grad":
        with torch.no_grad():
            out = _first(fn(cnn, batch, 3, **options))
    else:
        with torch.inference_mode():
            x = batch.clone()  # an inference tensor, as in trainer.validate()
            assert x.is_inference()
            out = _first(fn(cnn, x, torch.tensor([3, 3, 3, 3]), **options))
    assert not out.is_inference() and not out.requires_grad
    assert torch.equal(out, ref)
    assert_unchanged(before, cnn)


def test_rng_untouched_and_generators_private(cnn, batch):
    state = torch.get_rng_state()
    a = smoothgrad(cnn, batch, 0, samples=3)
    b = smoothgrad(cnn, batch, 0, samples=3)
    assert torch.equal(a, b)  # default generator: seed 0 every call
    assert not torch.equal(a, smoothgrad(cnn, batch, 0, samples=3, generator=1))
    g = torch.Generator().manual_seed(5)
    c = smoothgrad(cnn, batch, 0, samples=3, generator=g)
    assert not torch.equal(c, smoothgrad(cnn, batch, 0, samples=3, generator=g))  # the caller's generator advances
    assert torch.equal(torch.get_rng_state(), state)


def test_callable_model_and_layer_module(cnn, batch):
    wrapped = lambda x: {"logits": cnn(x)}["logits"]  # noqa: E731  a closure over the module
    ref = grad_cam(cnn, batch, 1, layer="0.3")
    assert torch.equal(grad_cam(wrapped, batch, 1, layer="0.3"), ref)  # name looked up in the closed-over module
    assert torch.equal(grad_cam(wrapped, batch, 1, layer=cnn[0][3]), ref)
    assert torch.equal(integrated_gradients(wrapped, batch, 1, steps=4), integrated_gradients(cnn, batch, 1, steps=4))


# --------------------------------------------------------------------------- targets
@pytest.mark.parametrize("fn,options", METHOD_CASES[:8])
def test_target_forms(cnn, batch, fn, options):
    pred = cnn(batch).argmax(1)
    by_int = _first(fn(cnn, batch, 2, **options))
    assert torch.equal(_first(fn(cnn, batch, torch.full((4,), 2), **options)), by_int)
    assert torch.equal(_first(fn(cnn, batch, lambda out: out[:, 2], **options)), by_int)
    assert torch.equal(_first(fn(cnn, batch, torch.full((4,), 2, dtype=torch.int32), **options)), by_int)
    assert torch.equal(_first(fn(cnn, batch, None, **options)), _first(fn(cnn, batch, pred, **options)))


@pytest.mark.parametrize("target,error,match", [
    pytest.param(-1, ValueError, "non-negative", id="negative"),
    pytest.param(10, ValueError, "below 10", id="too-large"),
    pytest.param(torch.zeros(4), TypeError, "integer tensor", id="float-tensor"),
    pytest.param(torch.zeros(3, dtype=torch.long), ValueError, r"shape \(4,\)", id="wrong-length"),
    pytest.param("cat", TypeError, "`target`", id="string"),
    pytest.param(True, TypeError, "`target`", id="bool"),
    pytest.param(lambda out: out, ValueError, r"target\(output\)", id="callable-wrong-shape"),
])
@pytest.mark.parametrize("fn", [pytest.param(f, id=f.__name__) for f in (saliency, integrated_gradients, occlusion,
                                                                         grad_cam, smoothgrad, lime)])
def test_bad_targets(cnn, batch, fn, target, error, match):
    before = snapshot(cnn)
    with pytest.raises(error, match=match):
        fn(cnn, batch, target)
    assert_unchanged(before, cnn)


# --------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("fn,kwargs,error,match", [
    pytest.param(integrated_gradients, {"steps": 0}, ValueError,
                 r"^Expected `steps` to be a positive int, but got 0\.$", id="ig-steps"),
    pytest.param(integrated_gradients, {"method": "simpson"}, ValueError, "'gausslegendre'.*'riemann_trapezoid'",
                 id="ig-method"),
    pytest.param(integrated_gradients, {"method": "riemann_trapezoid", "steps": 1}, ValueError, ">= 2",
                 id="ig-trapezoid-steps"),
    pytest.param(integrated_gradients, {"baseline": "black"}, ValueError, "'blur', 'uniform'", id="ig-baseline-name"),
    pytest.param(integrated_gradients, {"baseline": torch.zeros(3, 3)},
                 ValueError, "broadcastable", id="ig-baseline-shape"),
    pytest.param(integrated_gradients, {"internal_batch_size": 0}, ValueError, "`internal_batch_size`", id="ig-ibs"),
    pytest.param(integrated_gradients, {"generator": "seed"}, TypeError, "`generator`", id="ig-generator"),
    pytest.param(saliency, {"batch_size": 2.0}, TypeError, "`batch_size`.*positive int", id="batch-size-float"),
    pytest.param(saliency, {"abs": "yes"}, TypeError, "`abs` to be a bool", id="abs"),
    pytest.param(smoothgrad, {"kind": "var"}, ValueError, "'smoothgrad', 'smoothgrad_sq', 'vargrad'", id="sg-kind"),
    pytest.param(smoothgrad, {"noise": -0.1}, ValueError, "`noise`", id="sg-noise"),
    pytest.param(smoothgrad, {"samples": 0}, ValueError, "`samples`", id="sg-samples"),
    pytest.param(occlusion, {"window": 9}, ValueError, "`window`", id="occ-window-too-big"),
    pytest.param(occlusion, {"window": 2, "stride": 3}, ValueError, "`stride`", id="occ-stride"),
    pytest.param(occlusion, {"window": (1, 2, 2, 2)}, TypeError, "at most 3 ints", id="occ-window-rank"),
    pytest.param(occlusion, {"perturbations_per_eval": 0}, ValueError, "`perturbations_per_eval`", id="occ-ppe"),
    pytest.param(grad_cam, {"layer": "features.9"}, ValueError, "one of the model's layers: 0, 0.0", id="cam-layer"),
    pytest.param(grad_cam, {"layer": nn.Conv2d(1, 1, 1)}, ValueError, "submodule", id="cam-foreign-layer"),
    pytest.param(grad_cam, {"layer": "1.1"}, ValueError, r"\(N, channels, \*spatial\)", id="cam-flat-layer"),
    pytest.param(lime, {"segments": torch.zeros(4, 4, dtype=torch.long)}, ValueError, r"\(8, 8\)", id="lime-segments"),
    pytest.param(lime, {"segments": torch.zeros(8, 8)}, TypeError, "integer", id="lime-float-segments"),
    pytest.param(lime, {"grid": (9, 2)}, ValueError, "`grid`", id="lime-grid"),
    pytest.param(lime, {"samples": 1}, ValueError, ">= 2", id="lime-samples"),
    pytest.param(lime, {"kernel_width": 0}, ValueError, "`kernel_width`", id="lime-width"),
])
def test_bad_arguments(cnn, batch, fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(cnn, batch, 0, **kwargs)


@pytest.mark.parametrize("inputs,error", [
    pytest.param([1.0, 2.0], TypeError, id="list"),
    pytest.param(torch.ones(2, 4, dtype=torch.long), TypeError, id="int-tensor"),
    pytest.param(torch.ones(4), ValueError, id="1d"),
    pytest.param(torch.ones(0, 4), ValueError, id="empty"),
])
def test_bad_inputs_and_model(inputs, error):
    with pytest.raises(error, match="`inputs`"):
        saliency(nn.Linear(4, 2), inputs, 0)
    with pytest.raises(TypeError, match="`model`"):
        saliency("model", torch.ones(2, 4), 0)


def test_bad_model_output(batch):
    with pytest.raises(TypeError, match="model output"):
        saliency(lambda x: (x.flatten(1), None), batch, 0)


# --------------------------------------------------------------------------- registry
def test_registry_names_and_specs():
    assert set(METHODS) == {"saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "occlusion",
                            "grad_cam", "lime"}
    for name, row in METHODS.items():
        fn = row.fn
        assert get_method(name) == (name, fn, {})
        assert get_method(fn) == (name, fn, {})
    name, fn, options = get_method(("smoothgrad", {"samples": 4, "kind": "vargrad"}))
    assert (name, fn, options) == ("smoothgrad", smoothgrad, {"samples": 4, "kind": "vargrad"})

    def my_map(model, inputs, target=None):
        return inputs

    assert get_method(my_map) == ("my_map", my_map, {})


@pytest.mark.parametrize("spec,error,match", [
    pytest.param("gradcam", ValueError, "'saliency', 'input_x_gradient'.*'lime'", id="unknown-name"),
    pytest.param(("integrated_gradients", {"n_steps": 5}), ValueError,
                 "options of 'integrated_gradients'.*steps.*but got 'n_steps'", id="unknown-option"),
    pytest.param(("saliency", {1: 2}), TypeError, "dict of keyword", id="bad-options"),
    pytest.param(42, TypeError, "a method name", id="int"),
])
def test_registry_errors(spec, error, match):
    with pytest.raises(error, match=match):
        get_method(spec)


def test_is_signed():
    assert not is_signed("saliency") and is_signed("saliency", {"abs": False})
    assert is_signed("input_x_gradient") and is_signed("integrated_gradients") and is_signed("occlusion")
    assert is_signed("lime")
    assert not is_signed("grad_cam") and is_signed("grad_cam", {"relu": False})
    assert not is_signed("smoothgrad") and is_signed("smoothgrad", {"abs": False})
    assert not is_signed("smoothgrad", {"abs": False, "kind": "vargrad"})
    assert is_signed("some_custom_method")


# --------------------------------------------------------------------------- Captum adapter
def test_captum_adapter(cnn, batch):
    captum_attr = pytest.importorskip("captum.attr")
    t = cnn(batch).argmax(1)
    name, fn, options = get_method(captum_attr.Saliency(cnn))
    assert name == "captum_saliency" and isinstance(fn, CaptumMethod) and options == {}
    assert not is_signed(fn, options)  # the adapter carries its flag
    assert torch.equal(fn(cnn, batch, t, **options), saliency(cnn, batch, t))
    assert torch.equal(fn(cnn, batch, None), saliency(cnn, batch, t))  # None -> predicted class
    assert torch.equal(fn(cnn, batch, lambda out: out[:, 1]), saliency(cnn, batch, 1))  # callable target
    # options at call time, re-binding to another model, classes and (object, kwargs) pairs
    other = small_cnn().eval()
    assert torch.equal(fn(other, batch, 1, abs=False), saliency(other, batch, 1, abs=False))
    name, fn, _ = get_method((captum_attr.IntegratedGradients(cnn), {"n_steps": 8, "method": "riemann_middle"}))
    assert name == "captum_integrated_gradients" and is_signed(fn)
    ours = integrated_gradients(cnn, batch, t, steps=8, method="riemann_middle")
    assert (fn(cnn, batch, t) - ours).abs().max() <= 1e-6
    cam = from_captum(captum_attr.LayerGradCam, layer=cnn[0][3], relu_attributions=True)
    assert cam.name == "captum_layer_grad_cam" and not cam.signed
    assert torch.equal(cam(cnn, batch, t), grad_cam(cnn, batch, t, layer="0.3", upsample=False))
    nt = from_captum(captum_attr.NoiseTunnel(captum_attr.Saliency(cnn)), nt_type="vargrad", nt_samples=2)
    assert nt.name == "captum_noise_tunnel_saliency" and not nt.signed
    with torch.inference_mode():
        out = fn(cnn, batch.clone(), t)
    assert not out.is_inference() and (out - ours).abs().max() <= 1e-6
    with pytest.raises(TypeError, match="`attribution`"):
        from_captum(object())


# --------------------------------------------------------------------------- import isolation
_HEAVY = ("lightning", "pytorch_lightning", "lightning_fabric", "tensorboard", "matplotlib", "captum")


def _loaded_after(code: str):
    check = code + f"; import sys; print([m for m in {_HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_does_not_load_lightning_or_plotting():
    assert _loaded_after("import lightning_xai.attribution") == "[]"


@pytest.mark.parametrize("output, says", [
    pytest.param({"loss": torch.zeros(()), "logits": torch.zeros(2, 3)}, "one of 'loss', 'logits', as `output_key`",
                 id="dict"),
    pytest.param((torch.zeros(2, 3), torch.zeros(2)), r"model\(x\)\[0\]` \(or `output_key=0`", id="tuple"),
])
def test_a_tuple_or_dict_output_is_refused_with_the_fix_for_its_kind(output, says):
    from lightning_xai._utils import as_logits

    with pytest.raises(TypeError, match=says) as info:
        as_logits(output)
    assert ("[0]" in str(info.value)) == isinstance(output, tuple)  # a dict is not indexed by position
