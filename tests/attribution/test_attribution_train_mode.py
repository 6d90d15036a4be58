"""Attribution cores on a model in train mode (layer 2 and 3): explained in eval mode with a warning, every buffer,
flag, hook and random state as it was, results independent of the batch and chunk split; and Grad-CAM's warning for
a 1x1 map, naming the deepest layer before it with a larger map."""
import random
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from helpers import assert_unchanged, hook_count, small_cnn, snapshot
from lightning_xai._utils import preserve_modes
from lightning_xai.attribution import (
    from_captum,
    grad_cam,
    input_x_gradient,
    integrated_gradients,
    lime,
    occlusion,
    saliency,
    smoothgrad,
)


def _captum_ig(model, inputs, target=None, **options):
    from captum.attr import IntegratedGradients

    return from_captum(IntegratedGradients, n_steps=4)(model, inputs, target, **options)


# (function, its name in the warning, options, a cap on rows per pass that splits an 8-row batch)
METHODS = [
    pytest.param(saliency, "saliency", {}, {"batch_size": 2}, id="saliency"),
    pytest.param(input_x_gradient, "input_x_gradient", {}, {"batch_size": 2}, id="input_x_gradient"),
    pytest.param(smoothgrad, "smoothgrad", {"samples": 3}, {"batch_size": 4}, id="smoothgrad"),
    pytest.param(smoothgrad, "smoothgrad", {"samples": 3, "kind": "vargrad"}, {"batch_size": 4}, id="vargrad"),
    pytest.param(integrated_gradients, "integrated_gradients", {"steps": 4, "baseline": "uniform"},
                 {"internal_batch_size": 4}, id="ig"),
    pytest.param(occlusion, "occlusion", {"window": 4, "stride": 4}, {"perturbations_per_eval": 1}, id="occlusion"),
    pytest.param(grad_cam, "grad_cam", {"layer": "0.3"}, {"batch_size": 2}, id="grad_cam"),
    pytest.param(lime, "lime", {"samples": 8, "grid": (2, 2)}, {"batch_size": 4}, id="lime"),
    pytest.param(_captum_ig, "captum_integrated_gradients", {}, {"internal_batch_size": 8}, id="captum-ig"),
]


@pytest.fixture
def x():
    return torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def model():
    """BatchNorm (buffers that train mode updates, rows coupled) and dropout (random in train mode), in train mode."""
    torch.manual_seed(0)
    net = small_cnn(batchnorm=True, dropout=0.5)
    with torch.no_grad():  # running statistics far from a batch's own, so train and eval mode differ a lot
        net[0][1].running_mean.fill_(0.5)
        net[0][1].running_var.fill_(4.0)
    return net.train()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _ours(caught):
    return [w for w in caught if "to be in eval mode" in str(w.message)]


def _call(fn, model, inputs, **options):
    if fn is _captum_ig:
        pytest.importorskip("captum.attr")
    return _first(fn(model, inputs, None, **options))


# --------------------------------------------------------------------------- hygiene
@pytest.mark.parametrize("fn,name,options,chunk", METHODS)
def test_train_mode_leaves_every_buffer_flag_grad_and_rng(model, x, fn, name, options, chunk):
    model[1].eval()  # mixed flags come back exactly
    model[0][0].weight.grad = torch.ones_like(model[0][0].weight)
    before = snapshot(model)
    tracked = model[0][1].num_batches_tracked.clone()
    py_state, np_state = random.getstate(), np.random.get_state()
    with pytest.warns(RuntimeWarning, match=f"`{name}` explains it in eval mode"):
        _call(fn, model, x, **chunk, **options)
    assert_unchanged(before, model)  # state_dict bit for bit (running stats too), grads, flags, hooks, torch RNG
    assert torch.equal(model[0][1].num_batches_tracked, tracked)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]


@pytest.mark.parametrize("fn,name,options,chunk", METHODS)
def test_train_mode_flags_and_buffers_restored_when_the_model_raises(model, x, fn, name, options, chunk):
    calls = []

    def fail_on_second_call(module, args, output):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("forced failure")

    handle = model[1].register_forward_hook(fail_on_second_call)
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="eval mode"), pytest.raises(RuntimeError, match="forced failure"):
        _call(fn, model, x, **chunk, **options)
    assert_unchanged(before, model)
    handle.remove()


# --------------------------------------------------------------------------- results
@pytest.mark.parametrize("fn,name,options,chunk", METHODS)
def test_train_mode_result_is_per_sample_and_chunk_free(model, x, fn, name, options, chunk):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _call(fn, model, x, **options)
        alone = _call(fn, model, x[:4], **options)  # rows 0-3 without their batch-mates
        chunked = _call(fn, model, x, **chunk, **options)
        again = _call(fn, model, x, **options)  # dropout would make a second call differ
    torch.testing.assert_close(alone, full[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, full)
    model.eval()
    assert torch.equal(_call(fn, model, x, **options), full)  # explained in eval mode


# --------------------------------------------------------------------------- the warning
@pytest.mark.parametrize("fn,name,options,chunk", METHODS)
def test_warning_in_train_mode_once_per_model_and_never_in_eval_mode(model, x, fn, name, options, chunk):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _call(fn, model, x, **options)
        _call(fn, small_cnn().train(), x, **options)  # another model: warned again
    ours = _ours(caught)
    assert len(ours) == 2 and all(w.category is RuntimeWarning and w.filename == __file__ for w in ours)
    assert f"`{name}` explains it in eval mode" in str(ours[0].message) and "model.eval()" in str(ours[0].message)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with preserve_modes(model, eval_mode=True):  # what the callbacks do
            _call(fn, model, x, **options)
        model.eval()
        _call(fn, model, x, **options)
    assert not _ours(caught)


def test_one_batchnorm_in_train_mode_is_enough_to_warn(model, x):
    model.eval()
    model[0][1].train()
    with pytest.warns(RuntimeWarning, match="with 1 of its 14 modules in train mode"):
        saliency(model, x, 0)
    assert model[0][1].training and not model[0][0].training


# --------------------------------------------------------------------------- Grad-CAM on a 1x1 map
def _pooling_net():
    """ResNet-shaped: on 4x4 inputs ``stem`` keeps 4x4, ``layer3`` halves to 2x2, ``layer4`` to 1x1."""
    torch.manual_seed(0)

    def stage(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's; the model may still hold one
        scripted = torch.jit.script(nn.ReLU())  # a ScriptModule takes no hooks: the recording must skip it
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), scripted),
        layer3=stage(4, 8), layer4=stage(8, 8),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)),
    )).eval()


@pytest.mark.parametrize("layer,named", [
    pytest.param("layer4", "`layer4`", id="block"),
    pytest.param("layer4.0", "`layer4.0`", id="conv"),
    pytest.param(None, "`layer4.0`", id="default-last-conv"),
])
def test_grad_cam_1x1_map_warns_and_names_the_deepest_larger_layer(layer, named):
    net = _pooling_net()
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    hooks = hook_count(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cam = grad_cam(net, x, 0, layer=layer, relu=False, batch_size=2)
    ours = [w for w in caught if "Grad-CAM cannot localise" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]  # once per call, not once per chunk
    assert f"but got {named} with a 1x1 map" in str(ours[0].message)
    assert "`layer3` (2x2); pass `layer='layer3'`" in str(ours[0].message)
    assert ours[0].category is RuntimeWarning and ours[0].filename == __file__
    torch.testing.assert_close(cam, cam[:, :, :1, :1].expand_as(cam))  # the reason: one value per sample
    assert hook_count(net) == hooks


@pytest.mark.parametrize("layer", ["layer3", "stem"])
def test_grad_cam_no_warning_for_a_larger_map(layer):
    net = _pooling_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad_cam(net, torch.rand(3, 1, 4, 4), 0, layer=layer)
        grad_cam(small_cnn().eval(), torch.rand(3, 1, 8, 8), 0)  # the default layer, 8x8
    assert not caught, [str(w.message) for w in caught]


def test_grad_cam_1x1_map_on_a_plain_callable_names_no_layer():
    net = _pooling_net()
    layer = net.layer4
    forward = lambda z, nets=[net]: nets[0](z)  # noqa: E731  the module is hidden from `module_of`
    with pytest.warns(RuntimeWarning, match="but got Sequential with a 1x1 map.*No layer before it"):
        grad_cam(forward, torch.rand(2, 1, 4, 4), 0, layer=layer)


def test_grad_cam_recording_hooks_removed_when_the_model_raises():
    net = _pooling_net()
    handle = net.head.register_forward_hook(lambda m, i, o: (_ for _ in ()).throw(RuntimeError("forced failure")))
    x = torch.rand(2, 1, 4, 4)
    hooks = hook_count(net)
    before = snapshot(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning comes after the forward pass; none may come before it
        with pytest.raises(RuntimeError, match="forced failure"):
            grad_cam(net, x, 0, layer="layer4")
    assert hook_count(net) == hooks
    assert_unchanged(before, net)
    handle.remove()
