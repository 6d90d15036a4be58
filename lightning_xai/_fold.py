"""BatchNorm folded into the convolution before it, for the explanation passes of a model in eval mode.

In eval mode a BatchNorm layer is an affine map per channel, :math:`\\mathrm{BN}(z) = \\gamma (z - \\mu) / \\sqrt{
\\sigma^2 + \\epsilon} + \\beta` with its running statistics :math:`\\mu, \\sigma^2`. After a convolution
:math:`z = W * x + b` it can be folded into that convolution's weights:

.. math:: W' = W \\cdot s, \\qquad b' = (b - \\mu)\\, s + \\beta, \\qquad s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}

(:math:`s` scales each output channel). The folded model computes the same function with one layer fewer per pair,
forward and backward: on a CIFAR-sized CNN with three conv-BN pairs the explanation passes take about 13 % less time
(bench/layout.py). Only float rounding differs.

:func:`fold` never changes the model. It traces the module's forward with ``torch.fx`` into a graph that calls the
module's own submodules (the same objects, parameters shared), and replaces each conv-BN pair with a new
convolution holding the folded weights (no gradient). A pair is folded only when nothing else can see the
convolution's output: the BatchNorm is the convolution's only user, takes it as its only argument, and neither
module has hooks. Whatever does not trace (data-dependent control flow, unsupported calls) is not folded.
:meth:`Folded.refresh` recomputes the folded weights from the model's current ones (call it before each run: the
model trains in between).

Tracing follows the code once, with symbols for tensors; a forward that branches on a module flag or reads state
set elsewhere is recorded as it ran then. So the caller checks the folded model against the model itself on the
inputs it is about to explain (:func:`agrees`) and uses it only when their outputs agree.

This module imports torch only (no Lightning).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from lightning_xai._layout import CHECK_ROWS, _close, _leaves

#: Convolutions a following BatchNorm folds into (exact types: a subclass may change what ``forward`` computes).
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: BatchNorm layers that fold (in eval mode, with running statistics, they are a per-channel affine map).
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: Forwards of :data:`~lightning_xai._layout.CHECK_ROWS` rows one :func:`agrees` takes: the model and the folded one.
AGREE_PASSES = 2


def _hooked(m: nn.Module) -> bool:
    return any(bool(getattr(m, name, None)) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _foldable_norm(m: Any) -> bool:
    return (type(m) in NORMS and m.track_running_stats and m.running_mean is not None
            and m.running_var is not None and not _hooked(m))


def _foldable_conv(m: Any, norm: nn.Module) -> bool:
    return (type(m) in CONVS and m.out_channels == norm.num_features and m.weight.is_floating_point()
            and type(m.weight).__name__ != "DTensor" and not _hooked(m)
            and not torch.nn.utils.parametrize.is_parametrized(m))


def _new_conv(conv: nn.Module) -> nn.Module:
    """A convolution configured like ``conv``, with a bias, parameters without gradients (filled by refresh)."""
    new = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)
    new.requires_grad_(False)
    return new


class Folded:
    """A traced copy of a module's forward with its conv-BN pairs folded: call it like the module.

    Attributes:
        module: the ``torch.fx.GraphModule`` (its other submodules are the model's own objects).
        pairs: ``(folded convolution, convolution, BatchNorm)`` per folded pair.
    """

    def __init__(self, module: nn.Module, pairs: List[Tuple[nn.Module, nn.Module, nn.Module]]) -> None:
        self.module = module
        self.pairs = pairs
        self.refresh()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def refresh(self) -> None:
        """Fold the model's current convolution weights and BatchNorm statistics: :math:`W' = W s`,
        :math:`b' = (b - \\mu) s + \\beta`, :math:`s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}`."""
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


def fold(module: Any) -> Optional[Folded]:
    """``module`` with its conv-BN pairs folded (see the module docstring), or None: not an ``nn.Module``, nothing
    to fold, sharded parameters, or a forward ``torch.fx`` cannot trace. The module is not changed."""
    if not isinstance(module, nn.Module) or not any(_foldable_norm(m) for m in module.modules()):
        return None
    if any(type(p).__name__ == "DTensor" for p in module.parameters()):
        return None
    try:
        import torch.fx as fx

        graph = fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001 - anything fx cannot follow stays unfolded
        return None
    modules = dict(module.named_modules())
    graph_module = fx.GraphModule(module, graph)
    pairs: List[Tuple[nn.Module, nn.Module, nn.Module]] = []
    for node in list(graph.nodes):
        norm = modules.get(node.target) if node.op == "call_module" else None
        if norm is None or not _foldable_norm(norm) or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv = modules.get(source.target)
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
    return Folded(graph_module, pairs)


def agrees(run: Callable[[Tensor], Any], folded_run: Callable[[Tensor], Any], x: Tensor,
           rows: int = CHECK_ROWS) -> bool:
    """Whether ``folded_run`` gives ``run``'s outputs on the first ``rows`` rows of ``x``: no exception, the same
    tensors (integer ones equal, floating ones within :data:`~lightning_xai._layout.RTOL` of the largest finite
    magnitude). Runs without gradients; the caller holds the model in eval mode."""
    part = x[:rows].detach()
    with torch.no_grad():
        try:
            ref = _leaves(run(part))
            got = _leaves(folded_run(part))
        except Exception:  # noqa: BLE001 - a folded model that fails is not the model
            return False
    return len(ref) == len(got) > 0 and all(_close(a, b) for a, b in zip(ref, got))
