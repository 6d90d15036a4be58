"""Grad-CAM: a layer's activations weighted by the spatial mean of their gradients."""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_xai._utils import HookSet, Target, check_positive_int, chunks, expected, resolve_layer
from lightning_xai.attribution._common import (
    DEFAULT_MAX_ROWS,
    check_bool,
    check_common,
    guarded,
    module_of,
    private_copy,
    resolve_target_chunked,
    row_target,
    scores_of,
    warn_once,
)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def default_layer(model: nn.Module) -> nn.Module:
    """The last convolution of ``model`` (Grad-CAM's usual choice)."""
    convs = [m for m in model.modules() if isinstance(m, _CONV)]
    if not convs:
        raise ValueError(expected("layer", "given: the model has no Conv1d/2d/3d layer to default to",
                                  "None"))
    return convs[-1]


def _grad_cam_validate_args(model: Any, inputs: Tensor, target: Target, layer: Any, relu: Any, upsample: Any,
                            batch_size: Any) -> None:
    """Every argument but the layer's name, which needs the model (:func:`_grad_cam_resolve_layer`)."""
    check_common(model, inputs, target, min_ndim=3)
    check_bool("relu", relu)
    check_bool("upsample", upsample)
    check_positive_int("batch_size", batch_size, allow_none=True)
    if layer is not None and not isinstance(layer, (str, nn.Module)):
        raise TypeError(expected("layer", "None, a dotted layer name or an nn.Module", type(layer).__name__))


def _grad_cam_resolve_layer(model: Any, layer: Union[None, str, nn.Module]) -> nn.Module:
    if isinstance(layer, nn.Module) and not isinstance(model, nn.Module) and module_of(model) is None:
        return layer  # a plain callable: trust the module (the hook checks that it ran)
    module = module_of(model)
    if module is None:
        raise TypeError(expected("layer", "an nn.Module when `model` is a plain callable (no module found to "
                                          "look a name up in)", layer if layer is None else repr(layer)))
    if layer is None:
        return default_layer(module)
    return resolve_layer(module, layer)


_Shapes = List[Tuple[str, Optional[Tuple[int, ...]]]]


def _record_shape(finished: _Shapes, name: str, module: nn.Module, args: Any, output: Any) -> None:
    finished.append((name, tuple(output.shape) if isinstance(output, Tensor) else None))


@contextmanager
def _output_shapes(model: Optional[nn.Module]) -> Iterator[_Shapes]:
    """Record ``(name, output shape or None)`` of every submodule of ``model`` (ScriptModules, which take
    no hooks, excepted) in the order their forward passes finish; the temporary hooks are removed on
    exit, also when the model raises. ``model=None`` records nothing."""
    finished: _Shapes = []
    with HookSet() as hooks:
        for name, m in (model.named_modules() if model is not None else ()):
            if name and not isinstance(m, torch.jit.ScriptModule):
                hooks.add(m.register_forward_hook(partial(_record_shape, finished, name)))
        yield finished


def _larger_map_layer(finished: _Shapes, layer_name: Optional[str],
                      acts: Tensor) -> Optional[Tuple[str, Tuple[int, ...]]]:
    """The deepest layer finished no later than ``layer_name`` (in a recording of :func:`_output_shapes`)
    whose output is ``(rows, K, *spatial)`` like ``acts`` with more than one spatial position, called once
    per forward pass; ``(name, spatial shape)`` or None."""
    calls = Counter(name for name, _ in finished)
    best = None
    for name, shape in finished:
        if name == layer_name:
            break
        if (shape is not None and len(shape) == acts.ndim and shape[0] == acts.shape[0] and calls[name] == 1
                and torch.Size(shape[2:]).numel() > 1):
            best = (name, shape[2:])
    return best


def _warn_one_position(model: Optional[nn.Module], layer: nn.Module, finished: _Shapes, acts: Tensor) -> None:
    """Warn, once per layer (:func:`warn_once`), that a map with one spatial position cannot localise, naming the
    deepest layer before it with a larger map."""
    name = next((n for n, m in model.named_modules() if m is layer), None) if model is not None else None
    size = "x".join(str(s) for s in acts.shape[2:])
    larger = _larger_map_layer(finished, name, acts)
    if larger is None:
        hint = "No layer before it in the forward pass has a larger map."
    else:
        hint = (f"The deepest layer before it with a larger map is `{larger[0]}` ("
                + "x".join(str(s) for s in larger[1]) + f"); pass `layer='{larger[0]}'`.")
    shown = f"`{name}`" if name else type(layer).__name__
    warn_once(layer, "1x1 map", f"Expected `layer` to have a feature map larger than {size}, but got {shown} with a "
                                f"{size} map: Grad-CAM cannot localise there, the map is one value per sample "
                                f"(constant after upsampling). {hint}")


def _grad_cam_compute(model: Callable, inputs: Tensor, target: Target, layer: nn.Module, relu: bool,
                      upsample: bool, batch_size: Optional[int]) -> Tensor:
    cap = batch_size or DEFAULT_MAX_ROWS
    maps: List[Tensor] = []
    owner = module_of(model)
    with guarded(model, "grad_cam"), HookSet() as hooks:
        x = private_copy(inputs)
        if target is not None:
            target = resolve_target_chunked(model, x, target, cap)
        captured: List[Tensor] = []

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            captured.append(output)

        hooks.add(layer.register_forward_hook(keep))
        for a, b in chunks(x.shape[0], cap):
            captured.clear()
            leaf = x[a:b].detach().requires_grad_(True)  # so the layer output is part of a graph
            with _output_shapes(owner) if a == 0 else nullcontext([]) as finished:  # the first pass only
                scores = scores_of(model(leaf), row_target(target, slice(a, b)))
            if len(captured) != 1:
                raise ValueError(expected("layer", "a module called exactly once per forward pass",
                                          f"a module called {len(captured)} times"))
            acts = captured[0]
            if not isinstance(acts, Tensor) or acts.ndim < 3:
                got = acts if isinstance(acts, Tensor) else type(acts).__name__
                raise ValueError(expected("layer", "a module whose output is (N, channels, *spatial)", got))
            if a == 0 and acts.shape[2:].numel() == 1:
                _warn_one_position(owner, layer, finished, acts)
            (grads,) = torch.autograd.grad(scores.sum(), acts)
            weights = grads.mean(dim=tuple(range(2, grads.ndim)), keepdim=True)  # (n, K, 1, ..., 1)
            cam = (weights * acts).sum(dim=1, keepdim=True).detach()  # (n, 1, *spatial)
            maps.append(F.relu(cam) if relu else cam)
        cam = torch.cat(maps)
        if upsample:
            spatial = cam.ndim - 2
            if spatial != inputs.ndim - 2:
                raise ValueError(expected("upsample", f"False for a layer with {spatial} spatial dims and inputs "
                                                      f"with {inputs.ndim - 2}", True))
            cam = F.interpolate(cam, size=tuple(inputs.shape[2:]), mode=_INTERPOLATION[spatial], align_corners=False)
        return cam.detach()


def grad_cam(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Target = None,
    layer: Union[None, str, nn.Module] = None,
    relu: bool = True,
    upsample: bool = True,
    batch_size: Optional[int] = None,
) -> Tensor:
    r"""Grad-CAM: the layer's channels weighted by their mean gradient, summed, optionally ReLU'd.

    .. math:: A = \mathrm{ReLU}\Big(\sum_k \alpha_k A^k\Big),\quad
        \alpha_k = \frac{1}{Z}\sum_{ij} \frac{\partial f_c}{\partial A^k_{ij}}

    Selvaraju et al., 2017, https://arxiv.org/abs/1610.02391. Equals Captum's
    ``LayerGradCam(model, layer).attribute(inputs, target, relu_attributions=relu)``; with
    ``upsample=True`` the map is then resized to the inputs' spatial size by **bilinear**
    interpolation (``F.interpolate(..., align_corners=False)``, i.e. Captum's
    ``LayerAttribution.interpolate(map, size, "bilinear")``; Captum's default there is nearest).

    The model runs in eval mode, every flag restored after (with a warning if it was in train mode).

    Args:
        model: an ``nn.Module``, or a callable returning logits ``(N, classes)`` (then ``layer`` must
            be a module, unless the callable is a bound method or closure over one module).
        inputs: a float tensor ``(N, C, *spatial)``; never modified.
        target: a class index, a LongTensor ``(N,)``, None (each row's predicted class from the same
            forward pass) or a callable mapping the output to one score per row.
        layer: the module or its dotted name (unknown names list the valid ones); None: the model's
            last convolution. It must run once per forward and return ``(N, K, *spatial)``.
        relu: apply ReLU to the map (the paper's definition; Captum's default is False).
        upsample: resize to the inputs' spatial size; else the layer's spatial size is kept.
        batch_size: rows per forward/backward pass (None: :data:`DEFAULT_MAX_ROWS`).

    Returns:
        A detached tensor ``(N, 1, *inputs.shape[2:])`` (``upsample=True``) or ``(N, 1, *layer_spatial)``.

    Warns:
        RuntimeWarning: when the layer's map has one spatial position (1x1), which cannot localise; the
            message names the deepest layer before it, in the same forward pass, with a larger map.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
        ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
        >>> grad_cam(model, torch.rand(2, 1, 8, 8), target=0, layer="0").shape
        torch.Size([2, 1, 8, 8])
    """
    _grad_cam_validate_args(model, inputs, target, layer, relu, upsample, batch_size)
    module = _grad_cam_resolve_layer(model, layer)
    return _grad_cam_compute(model, inputs, target, module, relu, upsample, batch_size)
