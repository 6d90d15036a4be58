"""Plumbing shared by the attribution methods: argument checks, state guards and chunked passes.

Every method follows the same contract, and this module is where it lives:

* gradients come from ``torch.autograd.grad`` on a private copy of the inputs, never ``backward``,
  so ``param.grad`` is never touched and ``inputs`` (and its ``requires_grad``) stay as they were;
* the model runs in eval mode and every ``training`` flag is restored after (a model in train mode gets a
  warning): BatchNorm statistics and ``num_batches_tracked`` stay as they were, dropout is off, and a
  sample's map does not depend on which other samples share its batch or chunk;
* parameters are frozen for the call, which skips parameter gradients without changing results;
* randomness comes from a private ``torch.Generator``, never the global RNG;
* every forward pass sees at most a capped number of rows, and results do not depend on the cap;
* everything runs inside ``inference_mode(False)``, so the cores work under Lightning's
  ``torch.inference_mode()`` evaluation loops and return normal, detached tensors;
* ``torch.compile``'d modules run eagerly (:func:`eager_compiled`): hooks fire, nothing recompiles.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
import warnings
import weakref
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lightning_xai._utils import (
    Target,
    as_logits,
    chunks,
    eager_compiled,
    expected,
    frozen_params,
    gradient_context,
    preserve_modes,
    resolve_target,
    target_scores,
    validate_target,
)

#: Default cap on rows per forward pass (``batch_size``/``internal_batch_size`` = None). Measured in
#: ``bench/attribution.py``: on CPU under glibc malloc, passes of 64-128 rows are fastest; bigger
#: fused batches are slower (large buffers are mmap'd and unmapped on every call) and use memory
#: linearly in the row count.
DEFAULT_MAX_ROWS = 128

Generator = Union[None, int, torch.Generator]


# --------------------------------------------------------------------------- argument checks
def check_model(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` is callable."""
    if not callable(model):
        raise TypeError(expected("model", "an nn.Module or a callable returning logits (N, classes)",
                                 type(model).__name__))


def check_inputs(inputs: Any, min_ndim: int = 2) -> None:
    """Raise unless ``inputs`` is a floating-point tensor ``(N, ...)`` with at least ``min_ndim`` dims."""
    if not isinstance(inputs, Tensor):
        raise TypeError(expected("inputs", "a floating-point tensor (N, ...)", type(inputs).__name__))
    if not inputs.is_floating_point():
        raise TypeError(expected("inputs", "a floating-point tensor (N, ...)", inputs))
    if inputs.ndim < min_ndim or inputs.shape[0] == 0:
        shape = "(N, C, H, W)" if min_ndim == 4 else "(N, ...)" if min_ndim <= 2 else f"a tensor with {min_ndim} dims"
        raise ValueError(expected("inputs", f"a non-empty batch {shape}", inputs))


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(expected(name, "a bool", value))


def check_non_negative_float(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(expected(name, "a non-negative float", value))
    if not value >= 0 or value == float("inf"):
        raise ValueError(expected(name, "a non-negative float", value))


def check_positive_float(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(expected(name, "a positive float", value))
    if not value > 0 or value == float("inf"):
        raise ValueError(expected(name, "a positive float", value))


def check_common(model: Any, inputs: Any, target: Target, min_ndim: int = 2) -> None:
    """The checks every method starts with: model, inputs and target."""
    check_model(model)
    check_inputs(inputs, min_ndim)
    validate_target(target, inputs.shape[0])


def check_generator(generator: Any, device: Optional[torch.device] = None) -> None:
    """Raise unless ``generator`` is None, an int seed >= 0 or a ``torch.Generator`` (on ``device``'s type, when
    given)."""
    if generator is None or isinstance(generator, torch.Generator) and device is None:
        return
    if isinstance(generator, int) and not isinstance(generator, bool):
        if generator < 0:
            raise ValueError(expected("generator", "a torch.Generator, a non-negative int seed or None", generator))
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(expected("generator", "a torch.Generator, a non-negative int seed or None",
                                 type(generator).__name__))
    if generator.device.type != device.type:
        raise ValueError(expected("generator", f"a torch.Generator on the inputs' device ({device.type})",
                                  f"a generator on {generator.device.type}"))


def make_generator(generator: Generator, device: torch.device) -> torch.Generator:
    """A private generator: ``None`` -> seeded with 0, an int -> that seed, a Generator -> itself.

    A fresh generator is created on ``device`` so the global RNG is never read or advanced.
    """
    check_generator(generator, device)
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator(device=device).manual_seed(0 if generator is None else generator)


def check_baseline(baseline: Any, name: str = "baseline") -> None:
    """Raise ``TypeError`` unless ``baseline`` is a number or a tensor (its shape is checked against the inputs
    by :func:`as_baseline`)."""
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float, Tensor)):
        raise TypeError(expected(name, "a number or a tensor broadcastable to the inputs", type(baseline).__name__))


def as_baseline(baseline: Any, inputs: Tensor, name: str = "baseline") -> Tensor:
    """A scalar or a tensor broadcastable to ``inputs`` -> a tensor of ``inputs``' shape, dtype and device."""
    if isinstance(baseline, bool):
        raise TypeError(expected(name, "a number or a tensor broadcastable to the inputs", baseline))
    if isinstance(baseline, (int, float)):
        return torch.full_like(inputs, float(baseline))
    if isinstance(baseline, Tensor):
        try:
            return baseline.detach().to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs).clone()
        except RuntimeError as err:
            raise ValueError(expected(name, f"a tensor broadcastable to the inputs' shape {tuple(inputs.shape)}",
                                      baseline)) from err
    raise TypeError(expected(name, "a number or a tensor broadcastable to the inputs", type(baseline).__name__))


# --------------------------------------------------------------------------- models and guards
def module_of(model: Any) -> Optional[nn.Module]:
    """The ``nn.Module`` behind ``model``: itself, a bound method's owner, a partial's function, or
    the single module captured in a closure (e.g. ``lambda x: module(x)["logits"]``), looking through up to three
    wrappers that capture one function and no module; else None.
    """
    seen = 0
    while seen < 4:
        seen += 1
        if isinstance(model, nn.Module):
            return model
        owner = getattr(model, "__self__", None)
        if isinstance(owner, nn.Module):
            return owner
        if hasattr(model, "func") and hasattr(model, "args"):  # functools.partial
            model = model.func
            continue
        cells = getattr(model, "__closure__", None) or ()
        found, inner = [], []
        for cell in cells:
            try:
                value = cell.cell_contents
            except ValueError:  # empty cell
                continue
            if isinstance(value, nn.Module):
                found.append(value)
            elif isinstance(value, types.FunctionType):
                inner.append(value)
        if len(found) == 1:
            return found[0]
        if found or len(inner) != 1:
            return None
        model = inner[0]  # a wrapper of one function, e.g. ``lambda x: forward(x.double())``: look inside it
    return None


#: Frames in these files are skipped when a warning is attributed to the user's call (:func:`warn_at_caller`).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_CONTEXTLIB = os.path.abspath(contextlib.__file__)


def warn_at_caller(message: str, category: type = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside ``lightning_xai`` (and ``contextlib``).

    The warning then points at the line of the user's code that called into the package.
    """
    def internal(filename: str) -> bool:
        path = os.path.abspath(filename)
        return path.startswith(_PACKAGE_DIR) or path == _CONTEXTLIB

    level, frame = 1, sys._getframe(1)  # level 1: our caller; stacklevel counts from this function
    while frame is not None and internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


_warned: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


def warn_once(owner: Any, key: str, message: str, category: type = RuntimeWarning) -> None:
    """:func:`warn_at_caller` once per ``owner`` (a model or layer, forgotten with it) and ``key``."""
    seen = _warned.setdefault(owner, set())
    if key not in seen:
        seen.add(key)
        warn_at_caller(message, category)


def warn_if_training(module: nn.Module, method: str) -> None:
    """Warn, once per model and method (:func:`warn_once`), when any submodule of ``module`` is in train mode."""
    modules = list(module.modules())
    training = sum(m.training for m in modules)
    if training:
        message = (f"Expected `model` to be in eval mode, but got {type(module).__name__} with {training} of its "
                   f"{len(modules)} modules in train mode. `{method}` explains it in eval mode (BatchNorm uses its "
                   "running statistics, dropout is off), so a sample's map does not depend on the rest of its batch, "
                   "and leaves its flags and buffers as they were. Call `model.eval()` first to silence this warning "
                   "(shown once per model and method).")
        warn_once(module, f"train mode: {method}", message)


@contextmanager
def guarded(model: Any, method: str, grad: bool = True) -> Iterator[None]:
    """The state guards around one attribution call.

    Compiled modules run eagerly (:func:`eager_compiled`), autograd on (``grad=True``; also inside
    ``inference_mode``) or off (``grad=False``), the model in eval mode with every ``training`` flag
    restored after (:func:`preserve_modes`), parameters frozen while input gradients are taken. All
    restored in ``finally``, also when the model raises. A model with a submodule in train mode is
    explained in eval mode all the same, with a warning naming ``method`` (:func:`warn_if_training`):
    in train mode BatchNorm would update its running statistics and mix the rows of each pass, and
    dropout would make the maps random. A plain callable whose module cannot be found
    (:func:`module_of`) runs in whatever mode the caller left it.
    """
    module = module_of(model)
    if module is not None:
        warn_if_training(module, method)
    with ExitStack() as stack:
        stack.enter_context(eager_compiled())
        if grad:
            stack.enter_context(gradient_context())
        else:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.no_grad())
        if module is not None:
            stack.enter_context(preserve_modes(module, eval_mode=True))
            if grad:
                stack.enter_context(frozen_params(module))
        yield


def private_copy(inputs: Tensor) -> Tensor:
    """A detached normal (non-inference) copy of ``inputs``; call it inside :func:`guarded`."""
    return inputs.detach().clone()


# --------------------------------------------------------------------------- targets and passes
def row_target(target: Target, index: Union[slice, Tensor]) -> Target:
    """The target for a chunk of rows whose sample indices are ``index``."""
    if isinstance(target, Tensor):
        return target[index]
    return target


def resolve_target_chunked(model: Callable[[Tensor], Any], x: Tensor, target: Target, max_rows: int) -> Target:
    """:func:`resolve_target` run over chunks of at most ``max_rows`` rows (one no-grad pass in all)."""
    if isinstance(target, Tensor):  # a private normal copy (the caller's may be an inference tensor)
        return resolve_target(model, x, target).clone()  # type: ignore[union-attr]
    if target is not None:
        return resolve_target(model, x, target)
    parts = [resolve_target(model, x[a:b], None) for a, b in chunks(x.shape[0], max_rows)]
    return torch.cat(parts)  # type: ignore[arg-type]


def scores_of(output: Any, target: Target) -> Tensor:
    """One score per row; ``target=None`` means each row's own predicted class."""
    if target is None:
        target = as_logits(output).detach().argmax(dim=1)
    return target_scores(output, target)


def input_grad(model: Callable[[Tensor], Any], rows: Tensor, target: Target) -> Tuple[Tensor, Tensor]:
    """Gradient of the summed target scores with respect to ``rows`` (a fresh leaf), and the scores.

    Call it inside :func:`guarded` with ``grad=True``. Rows are independent in eval mode, so the
    gradient of the sum is each row's own input gradient.
    """
    leaf = rows.detach().requires_grad_(True)  # rows are our private copy, never the caller's tensor
    scores = scores_of(model(leaf), target)
    (grad,) = torch.autograd.grad(scores.sum(), leaf)
    return grad, scores.detach()


def forward_scores(model: Callable[[Tensor], Any], x: Tensor, target: Target, max_rows: int) -> Tensor:
    """Target scores of ``x`` (no grad), computed in chunks of at most ``max_rows`` rows."""
    parts = []
    with torch.no_grad():
        for a, b in chunks(x.shape[0], max_rows):
            parts.append(scores_of(model(x[a:b]), row_target(target, slice(a, b))).detach())
    return torch.cat(parts)


def expanded_chunks(repeats: int, n: int, max_rows: int,
                    device: torch.device) -> Iterator[Tuple[int, int, Tensor, Tensor]]:
    """Chunks of the ``repeats * n`` rows of an expanded batch laid out repeat-major (``row = k * n + i``).

    Yields ``(start, stop, k, i)``: the row range and, per row, its repeat index ``k`` (step, noise
    draw, mask) and sample index ``i``; at most ``max_rows`` rows per chunk. Rows are built chunk by
    chunk, so the expanded batch never exists in full.
    """
    for a, b in chunks(repeats * n, max_rows):
        rows = torch.arange(a, b, device=device)
        yield a, b, rows // n, rows % n


def spatial_view(v: Tensor, ndim: int) -> Tensor:
    """``v`` of shape ``(rows,)`` reshaped to ``(rows, 1, ..., 1)`` to broadcast over ``ndim``-dim rows."""
    return v.view(-1, *([1] * (ndim - 1)))
