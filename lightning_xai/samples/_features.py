"""Penultimate features for sample-level explanations: which layer, how to capture it, which samples.

Pure torch. Features are captured with a forward hook (input or output of a named layer) held in a
:class:`~lightning_xai._utils.HookSet`, so no hook outlives the call, even on error. Training samples
are read by dataset index (the first ``n``), never by iterating a ``DataLoader``, which would draw
from the global RNG.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from lightning_xai._utils import (HookSet, check_choice, check_positive_int, chunks, eager_compiled, expected,
                                  preserve_modes, resolve_layer)

CAPTURE = ("input", "output")


def last_linear(model: nn.Module) -> str:
    """Dotted name of the last ``nn.Linear`` of ``model`` (in module order).

    Raises:
        ValueError: when the model has no ``nn.Linear``; the message lists the layers to name instead.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    if not names:
        valid = [n for n, _ in model.named_modules() if n]
        raise ValueError(expected("layer", "given, since the model has no nn.Linear to take features from; one of: "
                                  + ", ".join(valid), None))
    return names[-1]


def resolve_feature_layer(model: nn.Module, layer: Optional[str] = None,
                          capture: Optional[str] = None) -> Tuple[str, str]:
    """``(layer name, "input" | "output")``: by default the input of the last ``nn.Linear``; a named layer's output.

    Raises:
        ValueError: for an unknown layer name (the valid names are listed) or capture mode.
    """
    if capture is not None:
        check_choice("capture", capture, CAPTURE)
    if layer is None:
        return last_linear(model), capture or "input"
    resolve_layer(model, layer, name="layer")
    return layer, capture or "output"


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise TypeError(expected("captured layer value", "a tensor (or a tuple starting with one)", type(value).__name__))


def capture_features(
    model: nn.Module,
    layer: str,
    inputs: Tensor,
    forward: Optional[Callable[[Tensor], Tensor]] = None,
    capture: str = "input",
    batch_size: Optional[int] = 256,
    eval_mode: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Run ``forward`` on ``inputs`` in batches and return the layer's flattened features and the outputs.

    The model runs in eval mode (every ``training`` flag restored after, so BatchNorm buffers are not
    updated); call it under ``no_grad``. The hook is removed before returning, also when the forward raises.

    Args:
        model: the module that holds ``layer``.
        layer: dotted layer name.
        inputs: ``(N, ...)``, already on the model's device.
        forward: ``inputs -> outputs`` (default ``model``); e.g. a logits function.
        capture: ``"input"`` (the first positional input of the layer) or ``"output"``.
        batch_size: samples per forward (None: all at once).
        eval_mode: put every submodule in eval mode for the call (restored after).

    Returns:
        ``(features (N, D) float32, outputs (N, ...))``, both detached.
    """
    check_choice("capture", capture, CAPTURE)
    check_positive_int("batch_size", batch_size, allow_none=True)
    module = resolve_layer(model, layer, name="layer")
    forward = model if forward is None else forward
    store: List[Tensor] = []

    if capture == "input":
        def hook(mod: nn.Module, args: Tuple[Any, ...]) -> None:
            store.append(_first_tensor(args).detach())
    else:
        def hook(mod: nn.Module, args: Tuple[Any, ...], out: Any) -> None:  # type: ignore[misc]
            store.append(_first_tensor(out).detach())

    feats, outs = [], []
    with eager_compiled(), HookSet() as hooks, preserve_modes(model, eval_mode=eval_mode):
        hooks.add(module.register_forward_pre_hook(hook) if capture == "input" else module.register_forward_hook(hook))
        for start, stop in chunks(inputs.shape[0], batch_size):
            store.clear()
            out = forward(inputs[start:stop])
            if not store:
                raise RuntimeError(f"The layer {layer!r} was not called in the forward pass; name a layer that is.")
            feats.append(store[-1].reshape(stop - start, -1).float())  # (batch, D)
            outs.append(out.detach())
    return torch.cat(feats), torch.cat(outs)


def first_samples(dataset: Any, n: Optional[int] = None) -> List[int]:
    """Indices ``0 .. min(n, len(dataset)) - 1``: the deterministic training subset."""
    check_positive_int("n", n, allow_none=True)
    size = len(dataset)
    return list(range(size if n is None else min(n, size)))


def read_samples(dataset: Any, indices: Sequence[int], to_xy: Callable[[Any], Tuple[Tensor, Optional[Tensor]]],
                 batch_size: Optional[int] = 256) -> Tuple[Tensor, Optional[Tensor]]:
    """``dataset[i]`` for each index, collated in batches and split into ``(inputs, labels or None)`` by ``to_xy``.

    Dataset transforms that draw random numbers do so from the global RNG: call this under
    ``torch.random.fork_rng()`` (the callbacks do).
    """
    check_positive_int("batch_size", batch_size, allow_none=True)
    xs: List[Tensor] = []
    ys: List[Tensor] = []
    for start, stop in chunks(len(indices), batch_size):
        x, y = to_xy(default_collate([dataset[i] for i in indices[start:stop]]))
        xs.append(x)
        if y is not None:  # float labels stay floats: a NaN must not become a class index
            ys.append(y.reshape(-1) if y.is_floating_point() else y.reshape(-1).long())
    if not xs:
        raise ValueError(expected("indices", "at least one sample index", list(indices)))
    labels: Optional[Tensor] = torch.cat(ys) if len(ys) == len(xs) else None
    return torch.cat(xs), labels


def dataset_features(
    model: nn.Module,
    layer: str,
    dataset: Any,
    indices: Sequence[int],
    to_xy: Callable[[Any], Tuple[Tensor, Optional[Tensor]]],
    forward: Optional[Callable[[Tensor], Tensor]] = None,
    capture: str = "input",
    batch_size: int = 256,
    device: Optional[torch.device] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Features, outputs and labels of ``dataset[i]`` for ``indices``, read and forwarded batch by batch.

    Only one batch of inputs is held at a time, so large images cost ``batch_size`` samples of memory,
    not ``len(indices)``. Call it in eval mode under ``no_grad`` and ``torch.random.fork_rng()``.

    Returns:
        ``(features (N, D) float32, outputs (N, ...), labels (N,) or None)``, on ``device``.
    """
    check_positive_int("batch_size", batch_size)
    feats, outs, ys = [], [], []
    for start, stop in chunks(len(indices), batch_size):
        x, y = read_samples(dataset, indices[start:stop], to_xy, batch_size=None)
        x = x if device is None else x.to(device)
        f, o = capture_features(model, layer, x, forward=forward, capture=capture, batch_size=None)
        feats.append(f)
        outs.append(o)
        if y is not None:
            ys.append(y if device is None else y.to(device))
    if not feats:
        raise ValueError(expected("indices", "at least one sample index", list(indices)))
    labels: Optional[Tensor] = torch.cat(ys) if len(ys) == len(feats) else None
    return torch.cat(feats), torch.cat(outs), labels
