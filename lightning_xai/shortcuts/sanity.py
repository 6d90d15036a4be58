"""Model-parameter randomisation check: does an attribution method explain the model at all?

Adebayo et al. 2018 (https://arxiv.org/abs/1810.03292): re-initialise the top layers and compare the
maps. A method whose maps barely change (Guided Backprop, and Input x Gradient on bright inputs, to
a degree) shows the input more than the model, so its figures say little about a shortcut.

The check works on a private deep copy (the model, its flags and the global RNG are untouched; new
weights come from a private ``torch.Generator``). It reports the mean over samples of the Spearman
rank correlation between ``|a|`` (summed over channels) before and after:

.. math:: \\rho_n = \\operatorname{corr}\\big(\\operatorname{rank}|a_n|, \\operatorname{rank}|a'_n|\\big)

and flags the method as *insensitive* when :math:`\\bar\\rho \\ge` ``threshold`` (default 0.8).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_xai._utils import Target, expected, preserve_modes, resolve_layer_patterns, resolve_target

SANITY_THRESHOLD = 0.8


@dataclass
class SanityResult:
    """``correlation``: mean Spearman rho; ``per_sample (N,)``; ``layers`` re-initialised; ``insensitive``."""

    correlation: float
    per_sample: Tensor
    layers: List[str] = field(default_factory=list)
    insensitive: bool = False


def _average_ranks(v: Tensor) -> Tensor:
    """Ranks ``1..P`` of a 1-D tensor, ties sharing their average rank."""
    order = v.argsort(stable=True)
    sorted_v = v[order]
    _, counts = torch.unique_consecutive(sorted_v, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2  # average rank of each tie group
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = avg.repeat_interleave(counts)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per row of ``a`` and ``b`` ``(N, ...)`` (ties get average ranks; NaN for a constant row).

    Example:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]]))
        tensor([-1.], dtype=torch.float64)
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(expected("b", f"a tensor of shape {tuple(a.shape)} (N, ...)", b))
    out = torch.empty(a.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        ra, rb = _average_ranks(a[i].flatten().cpu()), _average_ranks(b[i].flatten().cpu())
        ra, rb = ra - ra.mean(), rb - rb.mean()
        den = math.sqrt(float((ra ** 2).sum()) * float((rb ** 2).sum()))
        out[i] = float((ra * rb).sum()) / den if den > 0 else float("nan")
    return out


def top_layers(model: nn.Module, layers: Union[int, Sequence[str]]) -> List[str]:
    """Names of the modules to re-initialise: the last ``layers`` modules that own parameters, or the given names/patterns."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers <= 0:
            raise ValueError(expected("layers", "a positive int or a list of layer names", layers))
        owners = [name for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))]
        if not owners:
            raise ValueError(expected("model", "a module with parameters to re-initialise", type(model).__name__))
        return owners[-layers:]
    return resolve_layer_patterns(model, list(layers), name="layers")


def private_copy(model: nn.Module, shared: Sequence[Any] = ()) -> nn.Module:
    """A deep copy of ``model`` whose references to the objects in ``shared`` (e.g. the Lightning trainer a
    LightningModule is attached to) point at the originals instead of copies."""
    return copy.deepcopy(model, {id(obj): obj for obj in shared})


def randomise_layers(model: nn.Module, names: Sequence[str], generator: torch.Generator) -> None:
    """Re-draw every parameter of the named submodules in place: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch's
    default scale for linear and conv layers), from ``generator``. Call it on a copy."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            params = list(modules[name].parameters(recurse=False))
            weight = next((p for p in params if p.ndim >= 2), None)
            fan_in = weight[0].numel() if weight is not None else max(1, params[0].numel())
            bound = 1.0 / math.sqrt(fan_in)
            for p in params:
                fresh = (torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
                p.copy_(fresh.to(p))


def randomisation_check(
    model: nn.Module,
    method: Callable[..., Tensor],
    inputs: Tensor,
    target: Target = None,
    layers: Union[int, Sequence[str]] = 1,
    threshold: float = SANITY_THRESHOLD,
    seed: int = 0,
    method_options: Optional[Dict[str, Any]] = None,
    forward: Optional[Callable[[nn.Module, Tensor], Tensor]] = None,
    shared: Sequence[Any] = (),
) -> SanityResult:
    """Compare a method's maps on ``model`` and on a copy with its top layers re-initialised.

    Args:
        model: the model (never modified).
        method: ``method(model_or_callable, inputs, target, **options) -> maps`` (e.g. from
            :func:`lightning_xai.attribution.get_method`).
        inputs: ``(N, ...)`` samples; target: classes to explain (None: the original model's prediction,
            used for both maps).
        layers: how many parameter-owning modules to re-initialise, counted from the output, or names/patterns.
        threshold: mean Spearman rho at or above which the method counts as insensitive.
        seed: seed of the private generator for the new weights.
        method_options: keyword options for ``method``.
        forward: ``forward(module, inputs) -> logits`` when the module's own output is not the logits.
        shared: objects the model refers to that the copy must share rather than copy (a Lightning trainer).

    Returns:
        :class:`SanityResult`.

    Example:
        >>> from lightning_xai.attribution import saliency
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> res = randomisation_check(net, saliency, torch.rand(4, 1, 4, 4), layers=2)
        >>> res.layers
        ['1', '3']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(expected("model", "an nn.Module", type(model).__name__))
    if not 0 < threshold <= 1:
        raise ValueError(expected("threshold", "a float in (0, 1]", threshold))
    names = top_layers(model, layers)
    options = dict(method_options or {})

    def as_callable(m: nn.Module) -> Callable[[Tensor], Tensor]:
        return m if forward is None else (lambda x: forward(m, x))

    with preserve_modes(model, eval_mode=True):  # BatchNorm statistics and dropout untouched; the copy is in eval mode
        target = resolve_target(as_callable(model), inputs, target)
        before = method(as_callable(model), inputs, target, **options).detach()
        twin = private_copy(model, shared)
        randomise_layers(twin, names, torch.Generator().manual_seed(seed))
        after = method(as_callable(twin), inputs, target, **options).detach()
    reduce = (lambda a: a.float().abs().sum(1)) if before.ndim >= 3 else (lambda a: a.float().abs())
    rho = spearman(reduce(before), reduce(after))
    mean = float(rho.nanmean()) if bool(torch.isfinite(rho).any()) else float("nan")
    return SanityResult(mean, rho, names, bool(mean >= threshold))
