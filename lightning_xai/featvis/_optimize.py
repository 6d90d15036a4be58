r"""The feature-visualisation loop: gradient ascent on an image parametrisation, all targets as one batch.

.. math:: X^*_k = \arg\max_{X_k}\; \mathbb{E}_{T}\big[\,o_k(f(T(X_k)))\big] - \sum_r \lambda_r R_r(X_k)

for objectives :math:`o_k` (a channel, neuron, class logit, ...), random transforms :math:`T` and
regularisers :math:`R_r` (Erhan et al., 2009; Simonyan et al., 2013, https://arxiv.org/abs/1312.6034;
Olah et al., 2017, https://distill.pub/2017/feature-visualization/).

Do no harm: the model (and a generator prior) runs in eval mode with every ``training`` flag
restored afterwards, its parameters are frozen so no parameter gradient is ever computed (gradients
are taken with ``torch.autograd.grad`` with respect to the parametrisation only), forward hooks are
removed even on error, randomness comes from a private ``torch.Generator``, and the loop works inside
``torch.inference_mode()`` (Lightning's ``validate``/``test``).

This module imports torch only.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim.adam import adam

from lightning_xai._utils import (HookSet, as_logits, check_positive_int, eager_compiled, expected, frozen_params,
                                  gradient_context, preserve_modes, resolve_layer)
from lightning_xai.featvis._objectives import OUTPUT, Activations, Objective, class_indices, class_logit
from lightning_xai.featvis._param import Parametrization, _range_tensors, make_param
from lightning_xai.featvis._transforms import (Compose, Regularizer, RegularizerLike, Transform,
                                               default_regularizers, default_transforms)

ObjectiveLike = Union[Objective, int]


class FeatureVisResult(NamedTuple):
    """What :func:`render` returns (unpacks as ``images, activations, history``).

    Attributes:
        images: ``(K, C, H, W)`` in the value range, one per objective.
        activations: ``(K,)`` each objective on its final image, untransformed.
        history: ``{"objective": (steps, K), "loss": (steps,)}``; objective values on the transformed
            image at each step, before that step's update.
    """

    images: Tensor
    activations: Tensor
    history: Dict[str, Tensor]


def _as_objectives(objectives: Any) -> List[Objective]:
    items = [objectives] if isinstance(objectives, (Objective, int)) else objectives
    if not isinstance(items, (list, tuple, range)) or len(items) == 0:
        raise ValueError(expected("objectives", "an Objective, a class index, or a non-empty list of them",
                                  type(objectives).__name__))
    out: List[Objective] = []
    for item in items:
        if isinstance(item, Objective):
            out.append(item)
        elif isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            out.append(class_logit(item))
        else:
            raise ValueError(expected("objectives", "Objective instances or non-negative class indices", repr(item)))
    return out


def _render_validate_args(model: Any, objectives: Any, input_shape: Any, steps: Any, lr: Any, value_range: Any,
                          forward: Any) -> Tuple[List[Objective], Tuple[int, int, int]]:
    if not callable(model):
        raise TypeError(expected("model", "an nn.Module (or a callable when no layer is named)", type(model).__name__))
    if forward is not None and not callable(forward):
        raise TypeError(expected("forward", "a callable inputs -> model output", type(forward).__name__))
    objs = _as_objectives(objectives)
    if (not isinstance(input_shape, (tuple, list, torch.Size)) or len(input_shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape)):
        raise ValueError(expected("input_shape", "(C, H, W) with positive ints", repr(input_shape)))
    check_positive_int("steps", steps)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(expected("lr", "a positive float", lr))
    if not (isinstance(value_range, (tuple, list)) and len(value_range) == 2):
        raise ValueError(expected("value_range", "a pair (lo, hi)", repr(value_range)))
    return objs, tuple(int(s) for s in input_shape)


def _model_device_dtype(model: Any) -> Tuple[torch.device, torch.dtype]:
    if isinstance(model, nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(expected("layer output", "a tensor (or a tuple starting with one)", type(output).__name__))


def render(
    model: Any,
    objectives: Union[ObjectiveLike, Sequence[ObjectiveLike]],
    input_shape: Sequence[int],
    steps: int = 256,
    lr: float = 0.05,
    param: Union[str, Parametrization] = "fourier",
    transforms: Optional[Sequence[Transform]] = None,
    regularizers: Optional[Sequence[RegularizerLike]] = None,
    generator: Optional[torch.Generator] = None,
    seed: int = 0,
    value_range: Tuple[Any, Any] = (0.0, 1.0),
    forward: Optional[Callable[[Tensor], Any]] = None,
    num_threads: Optional[int] = None,
) -> FeatureVisResult:
    """Optimise one image per objective, as one batch, and return images, final activations and history.

    Args:
        model: the network (an ``nn.Module`` whenever an objective names a layer).
        objectives: :class:`Objective` s (image ``k`` maximises objective ``k``) or class indices (their logits).
        input_shape: ``(C, H, W)`` of one model input.
        steps: optimiser steps.
        lr: Adam learning rate on the parametrisation.
        param: ``"fourier"`` (default, 1/f-scaled spectrum), ``"pixel"``, or a :class:`Parametrization`
            such as ``GeneratorParam(decoder, code_shape)``.
        transforms: random transforms applied before each forward pass; ``None`` picks
            :func:`default_transforms` for the image size, ``[]`` disables them.
        regularizers: penalties on the image (rescaled to ``[0, 1]``); ``None`` = ``[L1(0.05), TotalVariation(0.05)]``,
            ``[]`` disables them.
        generator: a ``torch.Generator`` (CPU) for the random start and transforms; its state advances.
        seed: seeds a fresh private generator when ``generator`` is None.
        value_range: ``(lo, hi)`` of the model's inputs (floats, or per-channel tensors ``(C,)``).
        forward: maps inputs to the model output used by class objectives (e.g. ``lambda x: model(x)["logits"]``);
            hooks for layer objectives stay on ``model``.
        num_threads: intra-op CPU threads for this call only (restored after). Rendering runs many tiny
            ops; on a busy 2-core machine ``1`` was 5-20x faster than 2 threads for 8x8 inputs (bench/featvis.py).

    Returns:
        :class:`FeatureVisResult` ``(images (K, C, H, W), activations (K,), history)``.

    Raises:
        ValueError, TypeError: for invalid arguments; an unknown layer name lists the valid ones.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        >>> _ = net(torch.zeros(1, 1, 8, 8))
        >>> images, acts, history = render(net, [0, 1, 2], (1, 8, 8), steps=8)
        >>> images.shape, acts.shape, history["objective"].shape
        (torch.Size([3, 1, 8, 8]), torch.Size([3]), torch.Size([8, 3]))
    """
    objs, shape = _render_validate_args(model, objectives, input_shape, steps, lr, value_range, forward)
    if generator is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(expected("seed", "an int", seed))
        generator = torch.Generator().manual_seed(seed)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(expected("generator", "a torch.Generator", type(generator).__name__))
    parametrization = make_param(param)
    transform = Compose(default_transforms(shape[1], shape[2]) if transforms is None else list(transforms))
    regs = default_regularizers() if regularizers is None else list(regularizers)
    for r in regs:
        if not callable(r):
            raise TypeError(expected("regularizers", "callables images -> (K,)", type(r).__name__))
    layers = _resolve_layers(model, objs)
    check_positive_int("num_threads", num_threads, allow_none=True)
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _render_compute(model, objs, shape, steps, float(lr), parametrization, transform, regs, generator,
                               value_range, forward, layers)
    finally:
        if num_threads is not None:
            torch.set_num_threads(threads)


def _resolve_layers(model: Any, objs: Sequence[Objective]) -> Dict[Any, nn.Module]:
    """``{key used by the objectives: module}`` for every layer except the model output."""
    out: Dict[Any, nn.Module] = {}
    for obj in objs:
        for key in obj.layers:
            if key == OUTPUT or key in out:
                continue
            out[key] = resolve_layer(model, key, "layer")
    return out


class _Adam:
    """``torch.optim.Adam(tensors, lr)``'s update (default betas and eps) through torch's functional ``adam``, with
    the fused kernel where torch has one for these tensors (on CPU since torch 2.4: one kernel instead of a dozen
    small ones per step), else the plain one: the same update up to rounding. ``Optimizer.step`` spends more time in
    Python per step (hooks, parameter groups, state look-ups) than the update takes on a render's one tensor."""

    def __init__(self, tensors: List[Tensor], lr: float) -> None:
        self.tensors, self.lr, self.fused, self.t = tensors, lr, True, 0
        self.exp_avgs = [torch.zeros_like(t, memory_format=torch.preserve_format) for t in tensors]
        self.exp_avg_sqs = [torch.zeros_like(t, memory_format=torch.preserve_format) for t in tensors]
        self.steps = [torch.zeros((), dtype=torch.float32, device=t.device) for t in tensors]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        self.t += 1
        try:
            self._update(grads)
        except RuntimeError:  # no fused kernel for this device or dtype: the plain update from the same state
            if not self.fused:
                raise
            self.fused = False
            for s in self.steps:  # the fused path may have counted this step before its kernel refused
                s.fill_(self.t - 1)
            self._update(grads)

    def _update(self, grads: Sequence[Tensor]) -> None:
        adam(self.tensors, list(grads), self.exp_avgs, self.exp_avg_sqs, [], self.steps, fused=self.fused,
             foreach=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8,
             maximize=False)


class _ClassLogits:
    r"""Objectives that are all class logits, :math:`o_k = y_{k, c_k}`: linear in the logits, so the gradient of
    :math:`-\sum_k o_k` with respect to them is the constant :math:`-E`, :math:`E_{k, c_k} = 1` (0 elsewhere). It
    enters the backward pass at the logits; no objective is in the graph. The first output is checked by the
    objectives themselves (a class index out of range raises their error)."""

    def __init__(self, objs: List[Objective], classes: List[int]) -> None:
        self.objs, self.classes = objs, classes
        self.minus_e: Optional[Tensor] = None  # (K, classes)

    def __call__(self, output: Any) -> Tuple[Tensor, Tensor]:
        """``(logits (K, classes), -E)`` for one model output."""
        logits = as_logits(output)
        if self.minus_e is None:
            for obj in self.objs:
                obj({OUTPUT: logits.detach()})
            k = len(self.objs)
            if logits.shape[0] != k:
                raise ValueError(expected("model output", f"one row per image, ({k}, classes)", logits))
            self.rows = torch.arange(k, device=logits.device)
            self.cols = torch.tensor(self.classes, device=logits.device)
            self.minus_e = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
            self.minus_e[self.rows, self.cols] = -1.0
        return logits, self.minus_e

    def picked(self, logits: Tensor) -> Tensor:
        """``(..., K, classes)`` -> the objectives ``(..., K)``."""
        return logits[..., self.rows, self.cols]


def _closed_form_penalties(regs: List[Regularizer], images: Tensor, lo: Tensor, span: Tensor,
                           unit_range: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    r"""The regularisers' summed penalty ``(K,)`` on the images rescaled to ``[0, 1]``, :math:`U = (X - lo) / span`,
    and its gradient with respect to the images, :math:`\sum_r \nabla_U R_r / span` ``(K, C, H, W)``; ``(None,
    None)`` without regularisers."""
    if not regs:
        return None, None
    unit = images.detach() if unit_range else (images.detach() - lo) / span
    penalty = grad = None
    for r in regs:
        value, g = r.penalty_and_grad(unit)
        penalty = value if penalty is None else penalty + value
        grad = g if grad is None else grad.add_(g)
    return penalty, grad if unit_range else grad / span


def _render_compute(model: Any, objs: List[Objective], shape: Tuple[int, int, int], steps: int, lr: float,
                    param: Parametrization, transform: Compose, regs: List[RegularizerLike],
                    generator: torch.Generator, value_range: Tuple[Any, Any], forward: Optional[Callable],
                    layers: Dict[Any, nn.Module]) -> FeatureVisResult:
    r"""The loop. Each step takes one gradient of

    .. math:: \mathcal{L} = -\sum_k o_k(f(T(X_k))) + \sum_{r,k} R_r(X_k)

    with respect to the parametrisation, by one backward pass from two places: the model output (or the objectives'
    sum) and the images. At the images it injects the regularisers' gradient, :math:`\sum_r \nabla_X R_r`, which
    :class:`~lightning_xai.featvis.Regularizer` s compute in closed form; other callables are traced by autograd.
    When every objective is a class logit (:func:`~lightning_xai.featvis._objectives.class_indices`) the objective's
    gradient with respect to the logits is the constant :math:`-E` with :math:`E_{k, c_k} = 1`, injected at the
    output with no objective in the graph. The history's loss is :math:`\mathcal{L}` summed at the end.
    """
    k = len(objs)
    device, dtype = _model_device_dtype(model)
    needs_output = any(key == OUTPUT for obj in objs for key in obj.layers)
    run = forward if forward is not None else model
    # FSDP2 (fully_shard) gathers a unit's sharded parameters for the backward pass from a hook on the unit's
    # output: a gradient that enters inside a unit (an objective on an inner layer) needs the model's output in the
    # graph too, with weight zero (same gradient, every unit's hook fires).
    sharded = isinstance(model, nn.Module) and any(type(p).__name__ == "DTensor" for p in model.parameters())
    classes = None if sharded else class_indices(objs)
    closed = [r for r in regs if isinstance(r, Regularizer)]  # gradient in closed form
    traced = [r for r in regs if not isinstance(r, Regularizer)]  # other callables: through autograd
    acts: Activations = {}
    objective_hist: List[Tensor] = []
    penalty_hist: List[Tensor] = []

    def capture(key: Any) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            acts[key] = _first_tensor(output)
        return hook

    def evaluate(x: Tensor) -> Tensor:
        acts.clear()
        out = run(x)
        if needs_output:
            acts[OUTPUT] = out
        scores = [obj(acts) for obj in objs]  # each (B,)
        for j, s in enumerate(scores):
            if not isinstance(s, Tensor) or s.shape != (k,):
                raise ValueError(expected(f"objective {objs[j]!r} output", f"a tensor of shape ({k},)",
                                          s if isinstance(s, Tensor) else type(s).__name__))
        acts.clear()
        stacked = torch.stack([s[j] for j, s in enumerate(scores)])  # (K,): objective k on image k
        if sharded and isinstance(out, Tensor) and out.is_floating_point() and out.requires_grad:
            stacked = stacked + 0.0 * out.reshape(out.shape[0], -1).sum(1).to(stacked.dtype)
        return stacked

    with ExitStack() as stack:
        stack.enter_context(eager_compiled())  # hooks fire in a torch.compile'd model, nothing recompiles
        stack.enter_context(gradient_context())
        for m in [model] + param.modules():
            stack.enter_context(preserve_modes(m, eval_mode=True))
            stack.enter_context(frozen_params(m))
        hooks = stack.enter_context(HookSet())
        for key, module in layers.items():
            hooks.add(module.register_forward_hook(capture(key)))

        lo, hi = _range_tensors(value_range, shape[0], device, dtype)
        unit_range = bool((lo == 0).all() and (hi == 1).all())  # the regularisers' [0, 1] is the value range itself
        param.build((k,) + shape, value_range, generator, device, dtype)
        tensors = param.parameters()
        adam = _Adam(tensors, lr)
        class_grad = None if classes is None else _ClassLogits(objs, classes)
        span = hi - lo
        for _ in range(steps):
            images = param()  # (K, C, H, W)
            # the closed-form regularisers while the images are still in cache: penalty (K,), gradient (K, C, H, W)
            penalty, reg_grad = _closed_form_penalties(closed, images, lo, span, unit_range)
            x = transform(images, generator)
            outputs: List[Tensor] = []
            grad_outputs: List[Optional[Tensor]] = []
            total: Optional[Tensor] = None
            if class_grad is not None:
                logits, minus_e = class_grad(run(x))
                scores = logits.detach()  # (K, classes): objective k is column classes[k] of row k
                outputs.append(logits)
                grad_outputs.append(minus_e)
            else:
                scores = evaluate(x)  # (K,)
                total = -scores.sum()
            if traced:
                unit = images if unit_range else (images - lo) / span
                for r in traced:
                    value = r(unit)
                    total = value.sum() if total is None else total + value.sum()
                    penalty = value.detach() if penalty is None else penalty + value.detach()
            if reg_grad is not None:
                outputs.append(images)
                grad_outputs.append(reg_grad)
            if total is not None:
                outputs.append(total)
                grad_outputs.append(None)
            adam.step(torch.autograd.grad(outputs, tensors, grad_outputs))
            with torch.no_grad():
                param.after_step()
            objective_hist.append(scores.detach())
            if penalty is not None:
                penalty_hist.append(penalty)
        with torch.no_grad():
            images = param().detach()
            final = evaluate(images).detach()
    objective = torch.stack(objective_hist)  # (steps, K), or (steps, K, classes) for class objectives
    if class_grad is not None:
        objective = class_grad.picked(objective)  # (steps, K)
    loss = (torch.stack(penalty_hist) - objective if penalty_hist else -objective).sum(1)  # (steps,)
    history = {"objective": objective, "loss": loss}
    return FeatureVisResult(images, final, history)
