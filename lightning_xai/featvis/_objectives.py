"""Objectives for feature visualisation: what the optimised image should excite.

An :class:`Objective` maps the captured activations of one forward pass to one score per image
``(B,)``; :func:`~lightning_xai.featvis.render` maximises objective ``k`` on image ``k`` of the batch.
Objectives form a vector space: ``channel("features.3", 0) + 0.5 * diversity("features.3")``.

Layers are dotted module names (or the modules themselves); :data:`OUTPUT` (``"logits"``) stands for
the model output, which :func:`class_logit` reads.

This module imports torch only.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lightning_xai._utils import as_logits, expected

LayerRef = Union[str, nn.Module]
Activations = Dict[Any, Tensor]
OUTPUT = "logits"


class Objective:
    """A differentiable score per image, ``fn(activations) -> (B,)``, over the layers it names.

    Objectives support ``a + b``, ``a - b``, ``-a`` and ``w * a`` for a float ``w``.

    Args:
        fn: maps a dict ``{layer: activation (B, ...)}`` (the model output under :data:`OUTPUT`) to ``(B,)``.
        layers: the layers ``fn`` reads; each is captured with a forward hook during rendering.
        name: a short label used in logs and reprs.

    Example:
        >>> obj = channel("0", 1) - 0.1 * channel("0", 2)
        >>> acts = {"0": torch.ones(2, 3, 4, 4)}
        >>> obj(acts)
        tensor([0.9000, 0.9000])
    """

    def __init__(self, fn: Callable[[Activations], Tensor], layers: Sequence[LayerRef] = (),
                 name: str = "objective") -> None:
        if not callable(fn):
            raise TypeError(expected("fn", "a callable activations -> (B,)", type(fn).__name__))
        self.fn = fn
        self.layers: Tuple[LayerRef, ...] = tuple(dict.fromkeys(layers))  # ordered, unique
        self.name = name

    def __call__(self, acts: Activations) -> Tensor:
        return self.fn(acts)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def __add__(self, other: Any) -> "Objective":
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return Objective(partial(_plus_constant, self, other), self.layers, f"{self.name} + {other}")
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(partial(_plus, self, other), self.layers + other.layers, f"{self.name} + {other.name}")

    __radd__ = __add__

    def __mul__(self, weight: Any) -> "Objective":
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            return NotImplemented
        return Objective(partial(_times, weight, self), self.layers, f"{weight} * {self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return -1.0 * self

    def __sub__(self, other: Any) -> "Objective":
        if isinstance(other, Objective):
            return self + (-1.0 * other)
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return self + (-other)
        return NotImplemented


# Objectives hold module-level functions bound with functools.partial, never closures, so they pickle
# (ddp_spawn pickles the callbacks to start its processes).
def _plus_constant(obj: Objective, constant: float, acts: Activations) -> Tensor:
    return obj(acts) + constant


def _plus(a: Objective, b: Objective, acts: Activations) -> Tensor:
    return a(acts) + b(acts)


def _times(weight: float, obj: Objective, acts: Activations) -> Tensor:
    return weight * obj(acts)


def _spatial_mean(t: Tensor) -> Tensor:
    """``(B, C, ...)`` -> ``(B, C)`` averaged over every position (a ``(B, C)`` tensor passes through)."""
    return t.flatten(2).mean(2) if t.ndim > 2 else t


def _get(acts: Activations, layer: LayerRef) -> Tensor:
    try:
        return acts[layer]
    except KeyError as err:  # only reachable when an Objective is called by hand
        raise KeyError(f"The activations hold no entry for layer {layer!r}; captured: {list(acts)}.") from err


def _label(layer: LayerRef) -> str:
    return layer if isinstance(layer, str) else type(layer).__name__


def channel(layer: LayerRef, index: int, reduction: str = "mean") -> Objective:
    r"""Mean (or sum) of one channel's feature map, :math:`\frac{1}{HW}\sum_{ij} a_{c,ij}`.

    For a ``(B, C)`` layer (a linear layer) it is unit ``index``.

    Args:
        layer: layer name or module.
        index: channel index.
        reduction: ``"mean"`` or ``"sum"`` over positions.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(expected("reduction", "one of 'mean', 'sum'", reduction))
    return Objective(partial(_channel, layer, index, reduction), [layer], f"{_label(layer)}:{index}")


def _channel(layer: LayerRef, index: int, reduction: str, acts: Activations) -> Tensor:
    t = _get(acts, layer)[:, index]
    if t.ndim == 1:
        return t
    return t.flatten(1).mean(1) if reduction == "mean" else t.flatten(1).sum(1)


def neuron(layer: LayerRef, index: int, y: Optional[int] = None, x: Optional[int] = None) -> Objective:
    """One unit of a channel at position ``(y, x)`` (the centre by default)."""
    where = "c" if y is None else (y, x)
    return Objective(partial(_neuron, layer, index, y, x), [layer], f"{_label(layer)}:{index}@{where}")


def _neuron(layer: LayerRef, index: int, y: Optional[int], x: Optional[int], acts: Activations) -> Tensor:
    t = _get(acts, layer)[:, index]
    if t.ndim == 1:
        return t
    h, w = t.shape[-2:]
    return t[:, h // 2 if y is None else y, w // 2 if x is None else x]


def layer_objective(layer: LayerRef) -> Objective:
    r"""Overall activity of a layer (DeepDream), :math:`\frac{1}{CHW}\sum a^2`."""
    return Objective(partial(_layer_activity, layer), [layer], f"{_label(layer)}:all")


def _layer_activity(layer: LayerRef, acts: Activations) -> Tensor:
    return _get(acts, layer).flatten(1).pow(2).mean(1)


def class_logit(index: int, output_key: Any = OUTPUT) -> Objective:
    """The logit ``y_index`` of the model output (not the softmax, which can rise by lowering other classes)."""
    return Objective(partial(_class_logit, index, output_key), [output_key], f"class:{index}")


def _class_logit(index: int, output_key: Any, acts: Activations) -> Tensor:
    logits = as_logits(_get(acts, output_key))
    if not 0 <= index < logits.shape[1]:
        raise ValueError(expected("class index", f"an int in [0, {logits.shape[1] - 1}]", index))
    return logits[:, index]


def class_indices(objs: Sequence[Objective]) -> Optional[List[int]]:
    """The classes when every objective is a plain :func:`class_logit` of the model output (:data:`OUTPUT`), else
    None: objective ``k`` on image ``k`` is then ``logits[k, classes[k]]``, linear in the logits."""
    out = []
    for obj in objs:
        fn = obj.fn
        if not (isinstance(fn, partial) and fn.func is _class_logit and len(fn.args) == 2 and fn.args[1] == OUTPUT
                and not fn.keywords):
            return None
        out.append(fn.args[0])
    return out


def direction(layer: LayerRef, vector: Tensor, cossim_pow: float = 0.0) -> Objective:
    r"""Activation along a direction in channel space, :math:`\langle \bar a, v\rangle\,\cos(\bar a, v)^p`.

    ``\bar a`` is the position-averaged activation ``(B, C)``; ``cossim_pow > 0`` rewards alignment
    over sheer magnitude (as in Olah et al., 2017).
    """
    if not isinstance(vector, Tensor) or vector.ndim != 1:
        raise ValueError(expected("vector", "a 1-D tensor (C,)", vector))
    return Objective(partial(_direction, layer, vector, cossim_pow), [layer], f"{_label(layer)}:direction")


def _direction(layer: LayerRef, vector: Tensor, cossim_pow: float, acts: Activations) -> Tensor:
    a = _spatial_mean(_get(acts, layer))  # (B, C)
    v = vector.to(a)
    dot = a @ v
    if cossim_pow:
        cos = dot / (a.norm(dim=1) * v.norm()).clamp_min(1e-8)
        dot = dot * cos.clamp_min(1e-2) ** cossim_pow
    return dot


def diversity(layer: LayerRef) -> Objective:
    """Minus each image's mean cosine similarity to the others' Gram matrices (style) at ``layer``.

    Add it with a weight to push a batch of images apart (Olah et al., 2017). A batch of one scores 0.
    """
    return Objective(partial(_diversity, layer), [layer], f"{_label(layer)}:diversity")


def _diversity(layer: LayerRef, acts: Activations) -> Tensor:
    a = _get(acts, layer)
    b = a.shape[0]
    if b < 2:
        return a.new_zeros(b)
    flat = a.flatten(2) if a.ndim > 2 else a.unsqueeze(2)  # (B, C, HW)
    gram = torch.bmm(flat, flat.transpose(1, 2)).flatten(1)  # (B, C*C)
    gram = gram / gram.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sim = gram @ gram.T  # (B, B)
    return -(sim.sum(1) - sim.diagonal()) / (b - 1)


# --------------------------------------------------------------------------- target specs
TargetSpec = Union[Objective, int, Tuple[Any, ...]]


def objectives_from_spec(spec: Any, name: str = "targets") -> Tuple[str, List[Objective]]:
    """Expand a target spec into a label and a list of objectives (one image each).

    Accepted forms:
        - ``("logits", [0, 1, 2])``: class logits.
        - ``(layer, "channels", indices)``, ``(layer, "neurons", indices)``: channels / centre neurons.
        - ``(layer, "layer")``: one DeepDream image of the whole layer.
        - ``(label, [Objective, ...])``: objectives of your own, logged under ``label``.

    Raises:
        ValueError, TypeError: for anything else; the message shows the accepted forms.
    """
    forms = ("('logits', [classes]), (layer, 'channels', indices), (layer, 'neurons', indices), "
             "(layer, 'layer') or (label, [Objective, ...])")
    if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3) or not isinstance(spec[0], (str, nn.Module)):
        raise ValueError(expected(name, "a target spec such as " + forms,
                         spec if isinstance(spec, str) else repr(spec)))
    layer = spec[0]
    label = _label(layer)
    if len(spec) == 2 and spec[1] == "layer":
        return label, [layer_objective(layer)]
    if len(spec) == 2:
        items = list(spec[1]) if isinstance(spec[1], Iterable) else [spec[1]]
        if items and all(isinstance(o, Objective) for o in items):
            return label, items
        if layer == OUTPUT and items and all(_is_index(i) for i in items):
            return label, [class_logit(int(i)) for i in items]
        raise ValueError(expected(name, forms, repr(spec)))
    kind, indices = spec[1], spec[2]
    indices = [indices] if _is_index(indices) else list(indices) if isinstance(indices, Iterable) else None
    if kind not in ("channels", "neurons") or not indices or not all(_is_index(i) for i in indices):
        raise ValueError(expected(name, forms, repr(spec)))
    make = channel if kind == "channels" else neuron
    return label, [make(layer, int(i)) for i in indices]


def _is_index(i: Any) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0
