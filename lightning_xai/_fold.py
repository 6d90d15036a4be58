"""BatchNorm folded into the convolution before it, for the explanation passes of a model in eval mode.

In eval mode a BatchNorm layer is an affine map per channel, :math:`\\mathrm{BN}(z) = \\gamma (z - \\mu) / \\sqrt{
\\sigma^2 + \\epsilon} + \\beta` with its running statistics :math:`\\mu, \\sigma^2`. After a convolution
:math:`z = W * x + b` it can be folded into that convolution's weights:

.. math:: W' = W \\cdot s, \\qquad b' = (b - \\mu)\\, s + \\beta, \\qquad s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}

(:math:`s` scales each output channel). The folded model computes the same function with one layer fewer per pair,
forward and backward; only float rounding differs.

:func:`fold` never changes the model. It traces, with ``torch.fx``, a shadow of the module: a new object per module
holding the model's parameter and buffer tensors, copies of its data attributes (:func:`_copy_data`), its other
attributes shared, no hooks, in eval mode. What the forward writes on ``self`` while traced lands on the shadow, what
it prints is swallowed, a LightningModule's shadow has no trainer (a ``self.log`` while traced logs nothing), and
the global random generators are restored; a model that writes into its own parameters or buffers while traced gets
its buffers back and is not folded. The graph calls the shadows, and each conv-BN pair
becomes a new convolution holding the folded weights (no gradient). A pair is folded only when nothing else can see
the convolution's output: the BatchNorm is the convolution's only user and takes it as its only argument, and
neither module has hooks or parametrisations. Not folded at all: a forward ``torch.fx`` cannot trace (data-dependent
control flow), a model with forward pre-hooks (the old ``weight_norm``, ``spectral_norm`` and pruning recompute
weights in one) or backward hooks (they change input gradients alone), hooks registered for every module, a
``torch.compile``'d part, or sharded parameters. :meth:`Folded.refresh` recomputes the folded weights from the
model's current ones (call it before each run: the model trains in between) and says whether the shadow still holds
the model's tensors (a parameter replaced by a new object needs a new fold).

Tracing follows the code once, with symbols for tensors: a forward that reads a flag or a value set elsewhere, or a
forward hook that changes an output (the shadow has none), is recorded as it was then. So the caller checks the
folded copy against the model itself on the inputs it is about to explain, in every run (:func:`agrees`: outputs
and input gradients), and uses it only when they agree.

This module imports torch only (no Lightning).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from lightning_xai._layout import CHECK_ROWS, _close, _leaves
from lightning_xai._utils import forked_rng

#: Convolutions a following BatchNorm folds into (exact types: a subclass may change what ``forward`` computes).
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: BatchNorm layers that fold (in eval mode, with running statistics, they are a per-channel affine map).
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: Forward+backward passes of :data:`~lightning_xai._layout.CHECK_ROWS` rows one :func:`agrees` takes: the model and
#: the folded copy.
AGREE_PASSES = 2


#: A LightningModule's references to what runs it (a shadow holds None).
_ATTACHED = ("_trainer", "_fabric")
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _hooked(m: nn.Module, kinds: Tuple[str, ...] = _HOOKS) -> bool:
    return any(bool(getattr(m, name, None)) for name in kinds)


def _foldable_norm(m: Any) -> bool:
    return (type(m) in NORMS and m.track_running_stats and m.running_mean is not None
            and m.running_var is not None and not _hooked(m))


def _foldable_conv(m: Any, norm: nn.Module) -> bool:
    return (type(m) in CONVS and m.out_channels == norm.num_features and m.weight.is_floating_point()
            and type(m.weight).__name__ != "DTensor" and not _hooked(m)
            and not torch.nn.utils.parametrize.is_parametrized(m))


def _new_conv(conv: nn.Module) -> nn.Module:
    """A convolution configured like ``conv``, with a bias, parameters without gradients (filled by refresh)."""
    # skip_init: no initialisation, so no draw from the global random generator (refresh fills the weights)
    new = torch.nn.utils.skip_init(type(conv), conv.in_channels, conv.out_channels, conv.kernel_size,
                                   stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                                   bias=True, padding_mode=conv.padding_mode, device=conv.weight.device,
                                   dtype=conv.weight.dtype)
    new.requires_grad_(False)
    return new


class Folded:
    """A traced shadow of a module's forward with its conv-BN pairs folded: call it like the module.

    Attributes:
        module: the ``torch.fx.GraphModule`` (its submodules are shadows of the model's, sharing their tensors).
        pairs: ``(folded convolution, the model's convolution, the model's BatchNorm)`` per folded pair.
    """

    def __init__(self, module: nn.Module, pairs: List[Tuple[nn.Module, nn.Module, nn.Module]],
                 traced: List[nn.Module]) -> None:
        self.module = module
        self.pairs = pairs
        # every module traced, with its parameters, buffers and submodules then (the shadows of modules the graph
        # does not call, and their copied attributes, are not kept)
        self._traced = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in traced]
        self.refresh()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def current(self) -> bool:
        """Whether every module still holds the parameter and buffer objects and the submodules it was traced with."""
        return all(_same(params, m._parameters) and _same(buffers, m._buffers) and _same(children, m._modules)
                   for m, params, buffers, children in self._traced)

    @torch.inference_mode(False)
    @torch.no_grad()
    def refresh(self) -> bool:
        """Fold the model's current convolution weights and BatchNorm statistics: :math:`W' = W s`,
        :math:`b' = (b - \\mu) s + \\beta`, :math:`s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}`. False (nothing
        folded) when the model no longer holds the tensors it was traced with (:meth:`current`)."""
        if not self.current():
            return False
        for new, conv, norm in self.pairs:
            scale = (norm.running_var.to(conv.weight.dtype) + norm.eps).rsqrt()
            if norm.weight is not None:
                scale = scale * norm.weight.to(conv.weight.dtype)
            shift = -norm.running_mean.to(conv.weight.dtype)
            if conv.bias is not None:
                shift = shift + conv.bias
            shift = shift * scale
            if norm.bias is not None:
                shift = shift + norm.bias.to(conv.weight.dtype)
            new.weight.copy_(conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1))))
            new.bias.copy_(shift)
        return True


def _same(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


def _shadow(module: nn.Module, made: Dict[int, Tuple[nn.Module, nn.Module]], memo: Dict[int, Any]) -> nn.Module:
    """A new object of ``module``'s class holding the same parameter and buffer tensors, copies of its data attributes
    (:func:`_copy_data`: what the forward writes into them while traced stays on the shadow), its other attributes
    shared, no hooks, in eval mode, and shadows for submodules. ``made``: ``id(module) -> (module, shadow)``;
    ``memo``: copies made so far, holding the model's parameters and buffers as themselves."""
    if id(module) in made:
        return made[id(module)][1]
    twin = object.__new__(type(module))
    made[id(module)] = (module, twin)
    for key, value in module.__dict__.items():
        if key in ("_parameters", "_buffers", "_modules") or key in _HOOKS:
            continue
        # a LightningModule's shadow has no trainer: a self.log() while traced would log into the real one
        twin.__dict__[key] = None if key in _ATTACHED else _copy_data(value, memo)
    twin.__dict__["_parameters"] = dict(module._parameters)
    twin.__dict__["_buffers"] = dict(module._buffers)
    twin.__dict__["_modules"] = {k: None if v is None else _shadow(v, made, memo) for k, v in module._modules.items()}
    twin.__dict__["training"] = False
    for name in _HOOKS:  # none: tracing would call them with symbols (see the module docstring)
        if name in module.__dict__:
            twin.__dict__[name] = type(module.__dict__[name])()
    return twin


def _recomputing(m: nn.Module) -> bool:
    """Whether ``m`` has hooks that change what its forward computes where a traced copy would not run them: forward
    pre-hooks (the old ``weight_norm``, ``spectral_norm`` and pruning recompute the weight in one) and backward hooks
    (they change input gradients, which the outputs alone would not show)."""
    return _hooked(m, ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                       "_backward_pre_hooks"))


def _copy_data(value: Any, memo: Dict[int, Any]) -> Any:
    """``value`` with its data copied: tensors (detached clones; the model's parameters and buffers, in ``memo``,
    stay themselves), lists, tuples, dicts, sets, deques and namespaces (their subclasses too), through any nesting;
    any other object is shared."""
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, Tensor):
        with torch.no_grad():
            out: Any = value.detach().clone()
    elif isinstance(value, (list, collections.deque, set, dict)):
        out = copy.copy(value)  # the same class (defaultdict keeps its factory), emptied and refilled
        memo[id(value)] = out
        out.clear()
        if isinstance(value, dict):
            out.update({k: _copy_data(v, memo) for k, v in value.items()})
        elif isinstance(value, set):
            out.update(_copy_data(v, memo) for v in value)
        else:
            out.extend(_copy_data(v, memo) for v in value)
    elif isinstance(value, (tuple, frozenset)):
        items = [_copy_data(v, memo) for v in value]
        out = type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    elif isinstance(value, types.SimpleNamespace):
        out = types.SimpleNamespace(**{k: _copy_data(v, memo) for k, v in vars(value).items()})
    else:
        return value
    memo[id(value)] = out
    return out


def _global_hooks() -> bool:
    """Whether hooks registered for every module (``register_module_forward_hook`` and kin) are on: tracing would
    call them with symbols."""
    base = torch.nn.modules.module
    return any(bool(getattr(base, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
        "_global_module_registration_hooks", "_global_parameter_registration_hooks",
        "_global_buffer_registration_hooks"))


@torch.inference_mode(False)  # called under inference_mode too (a validation hook): the copy's tensors stay normal
def fold(module: Any) -> Optional[Folded]:
    """``module`` with its conv-BN pairs folded (see the module docstring), or None: not an ``nn.Module``, nothing
    to fold, sharded parameters, a ``torch.compile``'d part, or a forward ``torch.fx`` cannot trace. The module is not
    changed."""
    if not isinstance(module, nn.Module) or not candidates(module):
        return None
    if _global_hooks() or any(type(p).__name__ == "DTensor" for p in module.parameters()) or any(
            type(m).__name__ == "OptimizedModule" or _recomputing(m) for m in module.modules()):
        return None
    tensors = list(module.parameters()) + list(module.buffers())
    memo: Dict[int, Any] = {id(t): t for t in tensors}
    versions = [t._version for t in tensors]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    made: Dict[int, Tuple[nn.Module, nn.Module]] = {}
    devices = sorted({p.device for p in module.parameters() if p.device.type == "cuda"}, key=str)
    try:
        import torch.fx as fx

        # a forward may draw random numbers of a fixed shape while traced: every global generator is restored; what
        # it prints while traced is not the model's output
        with forked_rng(devices), contextlib.redirect_stdout(io.StringIO()):
            root = _shadow(module, made, memo)
            graph = fx.Tracer().trace(root)
            graph_module = fx.GraphModule(root, graph)
    except Exception:  # noqa: BLE001 - anything fx cannot follow stays unfolded
        graph_module = None
    if [t._version for t in tensors] != versions:  # the forward wrote into the model's tensors while traced
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        return None  # a model that writes into its own tensors is not folded
    if graph_module is None:
        return None
    original = {id(twin): m for m, twin in made.values()}
    modules = dict(root.named_modules())
    pairs: List[Tuple[nn.Module, nn.Module, nn.Module]] = []
    for node in list(graph.nodes):
        norm = original.get(id(modules.get(node.target))) if node.op == "call_module" else None
        if norm is None or not _foldable_norm(norm) or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv = original.get(id(modules.get(source.target)))
        if conv is None or not _foldable_conv(conv, norm):
            continue
        name = f"_xai_folded_{len(pairs)}"
        new = _new_conv(conv)
        graph_module.add_submodule(name, new)
        with graph.inserting_after(source):
            folded = graph.call_module(name, source.args, source.kwargs)
        node.replace_all_uses_with(folded)
        graph.erase_node(node)
        graph.erase_node(source)
        pairs.append((new, conv, norm))
    if not pairs:
        return None
    graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()  # the folded pairs' shadows
    graph_module.eval()
    return Folded(graph_module, pairs, [m for m, _ in made.values()])


def candidates(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm that could fold (in eval mode, with running statistics, no hooks): a
    check without tracing."""
    return any(_foldable_norm(m) for m in module.modules())


def agrees(run: Callable[[Tensor], Any], folded_run: Callable[[Tensor], Any], x: Tensor,
           rows: int = CHECK_ROWS) -> bool:
    """Whether ``folded_run`` computes ``run``'s function on the first ``rows`` rows of ``x``: no exception, the same
    outputs (integer tensors equal, floating ones within :data:`~lightning_xai._layout.RTOL` of the largest finite
    magnitude) and the same input gradient of a fixed random weighting of the floating outputs (a hook that changes
    gradients alone shows there). :data:`AGREE_PASSES` forward+backward passes; the caller holds the model in eval
    mode."""
    part = x[:rows].detach()
    try:
        ref, ref_grad = _outputs_and_gradient(run, part)
        got, got_grad = _outputs_and_gradient(folded_run, part)
    except Exception:  # noqa: BLE001 - a folded model that fails is not the model
        return False
    if not (len(ref) == len(got) > 0 and all(_close(a, b) for a, b in zip(ref, got))):
        return False
    return (ref_grad is None) == (got_grad is None) and (ref_grad is None or _close(ref_grad, got_grad))


def _outputs_and_gradient(run: Callable[[Tensor], Any], x: Tensor) -> Tuple[List[Tensor], Optional[Tensor]]:
    """``run(x)``'s tensors (detached) and the gradient with respect to ``x`` of their floating entries weighted by
    fixed uniform draws (a private generator; None when ``x`` is not floating or no output depends on it)."""
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.clone().requires_grad_(x.is_floating_point())
        outputs = _leaves(run(leaf))
        scored = [t for t in outputs if t.is_floating_point() and t.requires_grad]
        grad = None
        if scored:
            generator = torch.Generator().manual_seed(0)
            total = sum((t * torch.rand(t.shape, generator=generator, dtype=t.dtype).to(t.device)).sum()
                        for t in scored)
            (grad,) = torch.autograd.grad(total, leaf, allow_unused=True)
    return [t.detach() for t in outputs], grad
