"""Shared pure-torch helpers: argument messages, model-state guards, layer and target resolution.

Every core (``attribution``, ``probes``, ``featvis``, ``shortcuts``) builds on these so that the
"do no harm" contract lives in one place: gradient work happens in :func:`gradient_context`, module
flags are restored by :func:`preserve_modes`, hooks are removed by :class:`HookSet`, and nothing here
touches ``param.grad`` or the global RNG.

This module imports torch only (no Lightning), like every core package.
"""
from __future__ import annotations

import fnmatch
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

Target = Union[None, int, Tensor, Callable[[Tensor], Tensor]]


@dataclass(frozen=True)
class Passes:
    """Model passes of some work, counted per sample: ``forward`` forwards alone (no gradient) and ``gradient``
    forward+backward passes (a gradient with respect to the input). The benchmarks price each kind at its own
    measured cost; :attr:`equivalent` is the older single count (a forward alone taken as a third of a
    forward+backward).

    Example:
        >>> 32 * (Passes(forward=1) + Passes(gradient=16))
        Passes(forward=32.0, gradient=512.0)
    """

    forward: float = 0.0
    gradient: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "forward", float(self.forward))
        object.__setattr__(self, "gradient", float(self.gradient))

    def __add__(self, other: "Passes") -> "Passes":
        return Passes(self.forward + other.forward, self.gradient + other.gradient)

    def __mul__(self, k: float) -> "Passes":
        return Passes(self.forward * k, self.gradient * k)

    __rmul__ = __mul__

    @property
    def equivalent(self) -> float:
        """Forward+backward equivalents, a forward alone counting 1/3."""
        return self.gradient + self.forward / 3


# --------------------------------------------------------------------------- messages
def expected(name: str, what: str, got: Any) -> str:
    """Return the house error message: ``Expected `name` to be what, but got got.``."""
    if isinstance(got, Tensor):
        got = f"a tensor of shape {tuple(got.shape)} and dtype {got.dtype}"
    elif isinstance(got, str):
        got = repr(got)
    return f"Expected `{name}` to be {what}, but got {got}."


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``value`` is a positive int (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(expected(name, "a positive int" + (" or None" if allow_none else ""), value))
    if value <= 0:
        raise ValueError(expected(name, "a positive int" + (" or None" if allow_none else ""), value))


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``; ``TypeError`` when it is not even of a type one of
    them has (``3`` among names)."""
    if value not in choices:
        error = ValueError if any(type(value) is type(c) for c in choices) else TypeError
        raise error(expected(name, "one of " + ", ".join(repr(c) for c in choices), value))


def check_int(name: str, value: Any, minimum: Optional[int] = None) -> None:
    """Raise ``TypeError`` unless ``value`` is an int (not a bool), ``ValueError`` if it is below ``minimum``."""
    what = "an int" if minimum is None else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(expected(name, what, value if isinstance(value, (float, str)) else type(value).__name__))
    if minimum is not None and value < minimum:
        raise ValueError(expected(name, what, value))


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(expected(name, "a bool", value if isinstance(value, (int, float, str))
                                 else type(value).__name__))


def check_real(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``TypeError`` unless ``value`` is a real number (an int or float, not a bool), ``ValueError`` unless it
    is finite and within ``low``/``high`` (each bound included unless ``*_open``; None: unbounded).

    Example:
        >>> check_real("lr", 0.0, low=0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: Expected `lr` to be a positive float, but got 0.0.
    """
    if low is not None and high is not None:
        what = f"a float in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        what = "a positive float" if low == 0 and low_open else f"a float {'>' if low_open else '>='} {low}"
    elif high is not None:
        what = f"a float {'<' if high_open else '<='} {high}"
    else:
        what = "a finite float"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(expected(name, what, value if isinstance(value, str) else type(value).__name__))
    ok = value == value and abs(value) != float("inf")
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(expected(name, what, value))


# --------------------------------------------------------------------------- state guards
@contextmanager
def gradient_context() -> Iterator[None]:
    """Enable autograd even inside Lightning's ``torch.inference_mode()`` evaluation loops.

    Tensors created in inference mode must still be cloned inside this context before they can
    take part in autograd (see :func:`grad_input`).
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def grad_input(inputs: Tensor) -> Tensor:
    """A fresh leaf copy of ``inputs`` that requires grad; call it inside :func:`gradient_context`."""
    return inputs.detach().clone().requires_grad_(True)


@contextmanager
def forked_rng(devices: Sequence[Any] = ()) -> Iterator[None]:
    """Restore every global random state on exit: Python's ``random``, NumPy's (when NumPy is loaded) and torch's
    (CPU and the CUDA ``devices`` given), also when the body raises. Dataset reads and randomised methods run
    inside it, so a callback never changes what training draws next."""
    import random

    numpy = sys.modules.get("numpy")
    py_state = random.getstate()
    np_state = numpy.random.get_state() if numpy is not None else None
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            numpy.random.set_state(np_state)


@contextmanager
def preserve_modes(model: Any, eval_mode: bool = True) -> Iterator[None]:
    """Put every submodule of ``model`` in eval mode and restore each ``training`` flag on exit.

    Flags are written back directly (not through ``.train()``), so overridden ``train`` methods and
    frozen submodules keep exactly the state they had, also when the body raises.
    """
    modules: List[nn.Module] = list(model.modules()) if isinstance(model, nn.Module) else []
    flags = [m.training for m in modules]
    try:
        if eval_mode:
            for m in modules:
                m.training = False
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


@contextmanager
def frozen_params(model: Any) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter for the body and restore each flag after.

    Saves the work of computing parameter gradients when only input gradients are needed.
    """
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class HookSet:
    """Collects ``RemovableHandle`` objects and removes all of them on exit, even on error.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> with HookSet() as hooks:
        ...     _ = hooks.add(layer.register_forward_hook(lambda m, i, o: None))
        ...     len(layer._forward_hooks)
        1
        >>> len(layer._forward_hooks)
        0
    """

    def __init__(self) -> None:
        self._handles: List[Any] = []

    def add(self, handle: Any) -> Any:
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# --------------------------------------------------------------------------- layers
def layer_names(model: nn.Module) -> List[str]:
    """Dotted names of all submodules of ``model`` (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: Any, layer: Union[str, nn.Module], name: str = "layer") -> nn.Module:
    """Return the submodule named by ``layer`` (a dotted name or the module itself).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``layer`` is neither a str nor a module.
        ValueError: if the name or module is not part of ``model``; the message lists valid names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(expected("model", "an nn.Module when a layer is given", type(model).__name__))
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        if any(m is layer for m in modules.values()):
            return layer
        raise ValueError(expected(name, "a submodule of the model", type(layer).__name__))
    if not isinstance(layer, str):
        raise TypeError(expected(name, "a dotted layer name (str) or an nn.Module", layer))
    if layer in modules and layer != "":
        return modules[layer]
    raise ValueError(expected(name, "one of the model's layers: " + ", ".join(layer_names(model)), layer))


def resolve_layer_patterns(model: nn.Module, patterns: Sequence[str], name: str = "layers") -> List[str]:
    """Expand dotted names and glob patterns (``"features.*"``) into matching layer names, in model order.

    Raises:
        ValueError: if a pattern matches no layer; the message lists valid names.
    """
    names = layer_names(model)
    chosen: List[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(expected(name, "a list of layer names or glob patterns", pattern))
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(expected(name, "names or patterns matching the model's layers: " + ", ".join(names),
                                      pattern))
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in names if n in chosen]


# --------------------------------------------------------------------------- outputs and targets
def as_logits(output: Any) -> Tensor:
    """Check that a model output is a ``(N, classes)`` tensor and return it.

    Models returning tuples or dicts must be wrapped (``lambda x: model(x)["logits"]``) or, in a
    callback, given ``output_key``/``forward``; the error says so.
    """
    if isinstance(output, Tensor):
        if output.ndim == 1:
            return output.unsqueeze(1)
        if output.ndim != 2:
            raise ValueError(
                expected("model output", "logits of shape (N, classes), or (N,) / (N, 1) for one binary logit", output))
        return output
    if isinstance(output, Mapping):
        keys = ", ".join(repr(k) for k in list(output)[:8]) + (", ..." if len(output) > 8 else "")
        how = (f"for a dict output pass the key of its logits, one of {keys or 'its keys (it has none)'}, as "
               "`output_key` in the callbacks, or a callable such as `lambda x: model(x)[key]`")
    else:
        how = ("for a tuple or list output pass a callable such as `lambda x: model(x)[0]` (or `output_key=0` in the "
               "callbacks)")
    raise TypeError(expected("model output", f"a tensor of logits (N, classes); {how}", type(output).__name__))


def select_output(output: Any, key: Union[None, int, str]) -> Any:
    """Pick ``output[key]`` from a tuple/list/dict output (``key=None`` returns ``output``)."""
    if key is None:
        return output
    if isinstance(output, Tensor):  # indexing it would pick rows, not outputs
        raise ValueError(expected("output_key", "None for a model that returns a tensor", key))
    try:
        return output[key]
    except (KeyError, IndexError, TypeError) as err:
        keys = list(output.keys()) if isinstance(output, Mapping) else (
            list(range(len(output))) if isinstance(output, (tuple, list)) else "none (a tensor)")
        raise ValueError(expected("output_key", f"a key of the model output (valid: {keys})", key)) from err


def validate_target(target: Target, n: int) -> None:
    """Validate a target spec for a batch of ``n`` samples."""
    if target is None or callable(target) and not isinstance(target, Tensor):
        return
    if isinstance(target, bool):
        raise TypeError(expected("target", "an int, a LongTensor (N,), None or a callable", target))
    if isinstance(target, int):
        if target < 0:
            raise ValueError(expected("target", "a non-negative class index", target))
        return
    if isinstance(target, Tensor):
        if target.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.bool):
            raise TypeError(expected("target", "an integer tensor of class indices", target))
        if target.ndim != 1 or target.shape[0] != n:
            raise ValueError(expected("target", f"a LongTensor of shape ({n},)", target))
        return
    raise TypeError(expected("target", "an int, a LongTensor (N,), None or a callable", type(target).__name__))


def two_class_logits(output: Any) -> Tensor:
    r""":func:`as_logits`, with one binary logit per sample read as two classes.

    A single output per sample, ``(N,)`` or ``(N, 1)``, is taken as the logit :math:`z` of a binary classifier
    (a model trained with ``BCEWithLogitsLoss``) and returned as the logits :math:`(-z/2, z/2)`: their softmax is
    :math:`(1 - \sigma(z), \sigma(z))`, the predicted class is 1 where :math:`z > 0`, and explaining class 1
    (class 0) explains :math:`z/2` (:math:`-z/2`). The callbacks see every model through this view, so a binary
    model's predictions, labels 0/1 and class probabilities mean what they say.

    Example:
        >>> two_class_logits(torch.tensor([[2.0], [-4.0]]))
        tensor([[-1.,  1.],
                [ 2., -2.]])
    """
    logits = as_logits(output)
    if logits.shape[1] != 1:
        return logits
    return torch.cat([-0.5 * logits, 0.5 * logits], 1)


def class_probs(logits: Tensor) -> Tensor:
    r"""Class probabilities ``(N, classes)`` in float32 from logits; one logit per sample is a binary classifier
    (:func:`two_class_logits`), so it gives :math:`(1 - \sigma(z), \sigma(z))`.

    Example:
        >>> class_probs(torch.zeros(1, 1))
        tensor([[0.5000, 0.5000]])
    """
    return two_class_logits(logits).float().softmax(1)


def resolve_target(forward: Callable[[Tensor], Tensor], inputs: Tensor, target: Target) -> Target:
    """Turn ``target=None`` into the predicted classes (one no-grad forward); pass others through.

    Integer tensors are moved to the inputs' device as int64.
    """
    validate_target(target, inputs.shape[0])
    if target is None:
        with torch.no_grad():
            return as_logits(forward(inputs)).argmax(dim=1)
    if isinstance(target, Tensor):
        return target.to(device=inputs.device, dtype=torch.long)
    return target


def target_scores(output: Tensor, target: Target, repeat: int = 1) -> Tensor:
    """One score per row of ``output`` for ``target``.

    Args:
        output: logits ``(rows, classes)`` (or, for a callable target, whatever the model returned).
        target: an int, a LongTensor ``(N,)``, or a callable mapping the output to ``(rows,)``.
            ``None`` must have been resolved with :func:`resolve_target` first.
        repeat: rows per sample when the inputs were expanded sample-major, e.g. ``(N * steps)``
            rows laid out as ``repeat_interleave``; a tensor target is repeated to match.
    """
    if callable(target) and not isinstance(target, Tensor):
        scores = target(output)
        if not isinstance(scores, Tensor) or scores.ndim != 1 or scores.shape[0] != output.shape[0]:
            got = scores if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(expected("target(output)", f"a tensor of shape ({output.shape[0]},)", got))
        return scores
    logits = as_logits(output)
    if isinstance(target, int):
        if target >= logits.shape[1]:
            raise ValueError(expected("target", f"a class index below {logits.shape[1]}", target))
        return logits[:, target]
    if isinstance(target, Tensor):
        idx = target.repeat_interleave(repeat) if repeat > 1 else target
        if idx.is_inference():  # a label tensor from Lightning's inference_mode loop cannot be saved for backward
            with torch.inference_mode(False):
                idx = idx.clone()
        if idx.shape[0] != logits.shape[0]:
            raise ValueError(expected("target", f"{logits.shape[0] // max(repeat, 1)} class indices", target))
        if int(idx.max()) >= logits.shape[1] or int(idx.min()) < 0:
            raise ValueError(expected("target", f"class indices in [0, {logits.shape[1] - 1}]", target))
        return logits.gather(1, idx.view(-1, 1)).squeeze(1)
    raise TypeError(expected("target", "an int, a LongTensor (N,) or a callable", type(target).__name__))


def chunks(total: int, size: Optional[int]) -> Iterator[Tuple[int, int]]:
    """Yield ``(start, stop)`` pairs covering ``range(total)`` in pieces of at most ``size``."""
    size = total if size is None else max(1, size)
    for start in range(0, total, size):
        yield start, min(start + size, total)


@contextmanager
def eager_compiled() -> Iterator[None]:
    """Run every ``torch.compile``'d module or function eagerly in the body (``torch.compiler.set_stance``).

    Explanations need forward hooks on submodules, which a compiled graph ignores once it is built
    (dynamo does not guard on hooks), and they change grad mode, ``training`` flags and
    ``requires_grad``, which would make dynamo recompile the user's model (and, past its recompile
    limit, fall back to eager for training too). In the body, compiled code runs as plain PyTorch: hooks
    fire, nothing is recompiled, the compiled graphs are untouched. The previous stance is restored on
    exit. A no-op when dynamo was never loaded (nothing can be compiled then).

    Raises:
        RuntimeError: with torch < 2.6, which has no ``set_stance``, when dynamo is loaded.
    """
    if "torch._dynamo" not in sys.modules:
        yield
        return
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None:  # pragma: no cover - torch < 2.6
        raise RuntimeError("lightning_xai needs torch >= 2.6 (torch.compiler.set_stance) to explain a torch.compile'd "
                           f"module; this is torch {torch.__version__}. Upgrade torch or pass the uncompiled module.")
    with set_stance("force_eager"):
        yield


def is_compiled(model: Any) -> bool:
    """Whether ``model`` is or contains a ``torch.compile``'d module, or is a LightningModule compiled by
    ``Trainer.fit(torch.compile(module))``.

    Public facts only: ``torch.compile(module)`` returns a module of class ``OptimizedModule`` (its name, not the
    private ``torch._dynamo`` path), and Lightning's ``fit(torch.compile(module))`` unwraps it and sets compiled
    step functions on the instance, so they show up in ``vars(model)`` instead of coming from the class.
    """
    if "torch._dynamo" not in sys.modules or not isinstance(model, nn.Module):
        return False
    if any(callable(vars(model).get(name)) for name in _STEP_FUNCTIONS):
        return True
    return any(type(m).__name__ == "OptimizedModule" for m in model.modules())


_STEP_FUNCTIONS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


@contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """One intra-op thread for the body (restored after) when ``enabled``: many small ops and small LAPACK
    factorisations spin-wait on a busy CPU with more threads (measured on a loaded 2-core machine: a 330 x 330
    Newton solve took 170 ms with 2 threads, 1-2 ms with one; a 128-d eigh 1.4 s against 2 ms)."""
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(threads)
