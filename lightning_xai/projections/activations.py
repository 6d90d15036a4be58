"""Capture the activations of named layers with forward hooks and reduce them to one row per sample.

Pure torch. Hooks live in a :class:`~lightning_xai._utils.HookSet`, so they are removed even when the
forward pass raises; the model runs in eval mode with every train/eval flag restored after, and
nothing here touches parameters, ``param.grad`` or the global RNG.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lightning_xai._utils import HookSet, check_positive_int, chunks, expected, preserve_modes, resolve_layer

REDUCTIONS = ("flatten", "spatial_mean", "tokens_mean")
Reduce = Union[str, Callable[[Tensor], Tensor]]


def _first_tensor(output: Any) -> Tensor:
    """The tensor output of a layer: the output itself or the first tensor of a tuple/list/dict."""
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise TypeError(expected("layer output", "a tensor or a tuple/list/dict holding one", type(output).__name__))


def reduce_activations(acts: Tensor, reduce: Reduce = "flatten") -> Tensor:
    """Turn a layer's activations ``(N, ...)`` into features ``(N, D)``.

    Args:
        acts: activations with the batch first, e.g. ``(N, C, H, W)`` or ``(N, T, E)``.
        reduce: ``"flatten"`` (every value a feature), ``"spatial_mean"`` (mean over every dimension
            after the second: global average pooling for ``(N, C, H, W)``), ``"tokens_mean"`` (mean over
            dimension 1, the tokens of a ``batch_first`` sequence ``(N, T, E)``), or a callable
            ``(N, ...) -> (N, D)``.

    Returns:
        Float features ``(N, D)``.

    Raises:
        ValueError: for an unknown reduction or one that does not fit the shape.

    Example:
        >>> reduce_activations(torch.ones(4, 3, 5, 5), "spatial_mean").shape
        torch.Size([4, 3])
    """
    if callable(reduce):
        out = reduce(acts)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != acts.shape[0]:
            raise ValueError(expected("reduce(activations)", f"a tensor of shape ({acts.shape[0]}, D)", out))
        return out.float()
    if reduce not in REDUCTIONS:
        raise ValueError(expected("reduce", "a callable or one of " + ", ".join(repr(r) for r in REDUCTIONS), reduce))
    acts = acts.detach().float()
    if acts.ndim == 1:
        return acts.unsqueeze(1)
    if reduce == "flatten" or acts.ndim == 2:
        return acts.flatten(1)  # (N, D)
    if reduce == "spatial_mean":
        return acts.flatten(2).mean(2)  # (N, C)
    if acts.ndim != 3:
        raise ValueError(expected("activations for reduce='tokens_mean'", "a tensor of shape (N, T, E)", acts))
    return acts.mean(1)  # (N, E)


def capture_activations(
    model: nn.Module,
    inputs: Tensor,
    layers: Sequence[Union[str, nn.Module]],
    reduce: Reduce = "flatten",
    forward: Optional[Callable[[Tensor], Any]] = None,
    batch_size: Optional[int] = None,
    eval_mode: bool = True,
) -> Dict[str, Tensor]:
    """Run ``inputs`` through ``model`` without gradients and return each layer's reduced activations.

    Args:
        model: the module that owns ``layers``.
        inputs: a batch ``(N, ...)`` (float images, token ids, tabular rows).
        layers: dotted layer names or submodules of ``model``.
        reduce: how activations become features, see :func:`reduce_activations`.
        forward: what to call on a batch (default ``model``), e.g. ``lambda x: model(x, mask)``.
        batch_size: rows per forward pass (default: all at once).
        eval_mode: run with every submodule in eval mode (BatchNorm statistics and dropout frozen);
            each module's flag is restored afterwards.

    Returns:
        ``{layer name: (N, D)}``, in the order of ``layers``; a layer that runs several times in one
        forward pass keeps its last output.

    Raises:
        ValueError: for an unknown layer (the message lists the valid names) or a layer that did not run.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> {k: tuple(v.shape) for k, v in capture_activations(net, torch.randn(5, 4), ["1"]).items()}
        {'1': (5, 8)}
    """
    check_positive_int("batch_size", batch_size, allow_none=True)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(expected("layers", "a non-empty list of layer names or modules", layers))
    modules = [resolve_layer(model, layer, name="layers") for layer in layers]
    names = [layer if isinstance(layer, str) else _name_of(model, layer) for layer in layers]
    run = model if forward is None else forward
    parts: Dict[str, List[Tensor]] = {name: [] for name in names}
    current: Dict[str, Tensor] = {}

    def _hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            current[name] = _first_tensor(output).detach()
        return hook

    with HookSet() as hooks, torch.no_grad(), preserve_modes(model, eval_mode=eval_mode):
        for name, module in zip(names, modules):
            hooks.add(module.register_forward_hook(_hook(name)))
        for start, stop in chunks(inputs.shape[0], batch_size):
            current.clear()
            run(inputs[start:stop])
            for name in names:
                if name not in current:
                    raise ValueError(f"Layer {name!r} did not run in the forward pass, so it has no activations.")
                parts[name].append(reduce_activations(current[name], reduce))
    return {name: torch.cat(parts[name]) for name in names}


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError(expected("layers", "submodules of the model", type(module).__name__))  # pragma: no cover
