"""Token-level attributions for sequence models, taken at the embedding layer.

Token ids are not differentiable, so the attribution runs on the embedding layer's output: one
forward hook captures the embeddings of the input (and of the baseline), another replaces that
output with the tensor the attribution method asks about, so the model's own forward pass (masks,
positions, pooling) is used unchanged. The per-token score is the sum over the embedding dimension.
The maths is the attribution core's (:mod:`lightning_xai.attribution`); this module only moves it
from input space to embedding space.

Pure torch. Hooks live in a :class:`~lightning_xai._utils.HookSet` and are removed even on error;
``param.grad``, parameters, train/eval flags and the global RNG are never changed.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from lightning_xai._utils import (HookSet, Target, check_choice, eager_compiled, expected, frozen_params,
                                  gradient_context, resolve_layer, validate_target)
from lightning_xai.attribution import input_x_gradient, integrated_gradients, saliency, smoothgrad

#: Methods that work on embeddings (the image-only ones, occlusion/Grad-CAM/LIME, are left out).
TOKEN_METHODS: Dict[str, Callable[..., Any]] = {
    "integrated_gradients": integrated_gradients,
    "saliency": saliency,
    "input_x_gradient": input_x_gradient,
    "smoothgrad": smoothgrad,
}
SIGNED_TOKEN_METHODS = ("integrated_gradients", "input_x_gradient")
BASELINES = ("pad", "zero")
Baseline = Union[str, Tensor]


class _Captured(Exception):
    """Raised by the capture hook to stop a forward pass once the embeddings are known."""


def _embedding_output(output: Any) -> Tensor:
    if not isinstance(output, Tensor) or not output.is_floating_point():
        raise TypeError(expected("embedding layer output", "a floating-point tensor (N, T, E)",
                                 output if isinstance(output, Tensor) else type(output).__name__))
    return output


class EmbeddingSwap:
    """Forward hooks on an embedding layer: capture its output, or replace it with a given tensor.

    Use it as a context manager; both hooks are removed on exit, even when the model raises.

    Example:
        >>> emb = nn.Embedding(10, 4)
        >>> model = nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 2))
        >>> with EmbeddingSwap(emb) as swap:
        ...     e = swap.capture(model, torch.tensor([[1, 2, 3]]))
        ...     out = swap.run(model, torch.tensor([[1, 2, 3]]), torch.zeros_like(e))
        >>> e.shape, out.shape, len(emb._forward_hooks)
        (torch.Size([1, 3, 4]), torch.Size([1, 2]), 0)
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.hooks = HookSet()
        self._mode: Optional[str] = None
        self._value: Optional[Tensor] = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._mode == "capture":
            self._value = _embedding_output(output).detach()
            raise _Captured
        if self._mode == "replace":
            out = _embedding_output(output)
            if self._value.shape != out.shape:
                raise ValueError(expected("replacement embeddings", f"shape {tuple(out.shape)}", self._value))
            return self._value
        return None

    def __enter__(self) -> "EmbeddingSwap":
        self.hooks.add(self.layer.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.remove()
        self._mode, self._value = None, None

    def capture(self, forward: Callable[[Tensor], Any], input_ids: Tensor) -> Tensor:
        """The embedding layer's output for ``input_ids`` (the rest of the forward pass is skipped)."""
        self._mode, self._value = "capture", None
        try:
            with torch.no_grad():
                forward(input_ids)
        except _Captured:
            pass
        finally:
            self._mode = None
        if self._value is None:
            raise ValueError("The embedding layer did not run in the forward pass; check `embedding_layer`.")
        value, self._value = self._value, None
        return value

    def run(self, forward: Callable[[Tensor], Any], input_ids: Tensor, embeddings: Tensor) -> Any:
        """``forward(input_ids)`` with the embedding layer's output replaced by ``embeddings``."""
        self._mode, self._value = "replace", embeddings
        try:
            return forward(input_ids)
        finally:
            self._mode, self._value = None, None


def _token_attributions_validate_args(model: Any, input_ids: Any, target: Target, method: Any, baseline: Any,
                                      forward: Any) -> None:
    if not callable(model):
        raise TypeError(expected("model", "an nn.Module or a callable returning logits (N, classes)",
                                 type(model).__name__))
    if forward is not None and not callable(forward):
        raise TypeError(expected("forward", "a callable input_ids -> logits", type(forward).__name__))
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(expected("input_ids", "an integer tensor (N, T)",
                                 input_ids if isinstance(input_ids, Tensor) else type(input_ids).__name__))
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError(expected("input_ids", "a non-empty integer tensor (N, T)", input_ids))
    check_choice("method", method, tuple(TOKEN_METHODS))
    validate_target(target, input_ids.shape[0])
    if isinstance(baseline, str):
        check_choice("baseline", baseline, BASELINES)
    elif not isinstance(baseline, Tensor):
        raise TypeError(expected("baseline", "'pad', 'zero', a tensor of token ids or a tensor of embeddings",
                                 type(baseline).__name__))


def token_attributions(
    model: Callable[[Tensor], Any],
    input_ids: Tensor,
    target: Target = None,
    embedding_layer: Union[str, nn.Module] = "embedding",
    method: str = "integrated_gradients",
    baseline: Baseline = "pad",
    pad_token_id: int = 0,
    forward: Optional[Callable[[Tensor], Any]] = None,
    return_delta: bool = False,
    **options: Any,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Per-token attributions of a sequence classifier, computed at its embedding layer.

    With :math:`e(x)` the embedding layer's output for token ids :math:`x` and :math:`g` the rest of
    the model, the attribution of token :math:`t` is :math:`\sum_d A(e)_{t,d}` where :math:`A` is the
    chosen method applied to :math:`g` at :math:`e(x)`; for Integrated Gradients

    .. math:: A_t = \sum_d (e_{t,d} - b_{t,d}) \int_0^1 \partial_{e_{t,d}} f_c\big(b + \alpha (e - b)\big) d\alpha

    so :math:`\sum_t A_t \approx f_c(x) - f_c(b)` (completeness). Sundararajan et al., 2017,
    https://arxiv.org/abs/1703.01365; the embedding-layer form is Captum's
    ``LayerIntegratedGradients``. Each sample is explained in its own calls, so the model always
    sees the ids of the sample it is explaining (padding masks stay right).

    Args:
        model: the module that owns ``embedding_layer`` (or any callable when ``embedding_layer`` is
            a module); called on token ids unless ``forward`` is given.
        input_ids: integer tensor ``(N, T)``.
        target: a class index, a LongTensor ``(N,)``, None (the predicted class) or a callable
            mapping the output to one score per row.
        embedding_layer: the layer whose output is the token embeddings ``(N, T, E)``: a dotted
            name in ``model`` or the module.
        method: ``"integrated_gradients"`` (default, signed), ``"saliency"`` (sum of ``|gradient|``),
            ``"input_x_gradient"`` (signed) or ``"smoothgrad"``.
        baseline: for Integrated Gradients: ``"pad"`` (the embeddings of an all-``pad_token_id``
            sequence; pad positions then get exactly 0), ``"zero"`` (zero embeddings), a LongTensor of
            token ids ``(T,)``/``(N, T)``, or a float tensor of embeddings broadcastable to ``(N, T, E)``.
        pad_token_id: the id used by ``baseline="pad"``.
        forward: ``input_ids -> logits``, e.g. ``lambda ids: model(ids, mask)["logits"]`` (default ``model``).
        return_delta: for Integrated Gradients, also return the completeness gap ``(N,)``.
        **options: passed to the method, e.g. ``steps``, ``method`` (quadrature),
            ``internal_batch_size`` for Integrated Gradients, ``samples``/``noise`` for SmoothGrad.

    Returns:
        Attributions ``(N, T)`` (detached, float), or ``(attributions, delta)`` with ``return_delta``.

    Raises:
        TypeError, ValueError: for a bad argument; an unknown layer name lists the valid ones.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> attr, delta = token_attributions(model, torch.tensor([[1, 2, 3]]), target=1, embedding_layer="0",
        ...                                  return_delta=True)
        >>> attr.shape, bool(delta.abs().max() < 1e-4)
        (torch.Size([1, 3]), True)
    """
    _token_attributions_validate_args(model, input_ids, target, method, baseline, forward)
    if return_delta and method != "integrated_gradients":
        raise ValueError(expected("return_delta", "False unless method='integrated_gradients'", return_delta))
    layer = embedding_layer if isinstance(embedding_layer, nn.Module) and not isinstance(model, nn.Module) \
        else resolve_layer(model, embedding_layer, name="embedding_layer")
    run = model if forward is None else forward
    fn = TOKEN_METHODS[method]
    n = input_ids.shape[0]
    attrs, deltas = [], []
    module = model if isinstance(model, nn.Module) else layer
    with eager_compiled(), gradient_context(), frozen_params(module), EmbeddingSwap(layer) as swap:
        for i in range(n):
            ids = input_ids[i:i + 1]  # (1, T)
            emb = swap.capture(run, ids)  # (1, T, E)

            def embedded(e: Tensor, ids: Tensor = ids) -> Any:  # rows of embeddings -> logits, same sample's ids
                return swap.run(run, ids.expand(e.shape[0], -1), e)

            row_target = target[i:i + 1] if isinstance(target, Tensor) else target
            opts = dict(options)
            if method == "integrated_gradients":
                opts["baseline"] = _baseline_embeddings(swap, run, baseline, ids, emb, pad_token_id, i)
                opts["return_delta"] = return_delta
            out = fn(embedded, emb, row_target, **opts)
            attr, delta = out if (method == "integrated_gradients" and return_delta) else (out, None)
            attrs.append(attr.sum(-1).float())  # (1, T): sum over the embedding dimension
            if delta is not None:
                deltas.append(delta.float())
    attributions = torch.cat(attrs)
    return (attributions, torch.cat(deltas)) if return_delta else attributions


def _baseline_embeddings(swap: EmbeddingSwap, run: Callable[[Tensor], Any], baseline: Baseline, ids: Tensor,
                         emb: Tensor, pad_token_id: int, i: int) -> Tensor:
    """The IG baseline in embedding space for sample ``i`` (ids ``(1, T)``, embeddings ``(1, T, E)``)."""
    if isinstance(baseline, str):
        if baseline == "zero":
            return torch.zeros_like(emb)
        return swap.capture(run, torch.full_like(ids, pad_token_id))
    if baseline.is_floating_point():
        b = baseline[i:i + 1] if baseline.ndim == 3 and baseline.shape[0] > 1 else baseline
        return b.detach().to(emb)
    base_ids = baseline.view(1, -1) if baseline.ndim == 1 else baseline[i:i + 1]
    if base_ids.shape != ids.shape:
        raise ValueError(expected("baseline", f"token ids of shape ({ids.shape[1]},) or (N, {ids.shape[1]})", baseline))
    return swap.capture(run, base_ids.to(ids))


def token_share(attributions: Tensor, input_ids: Tensor, token_id: int) -> Tensor:
    r"""Per sample, the share of total ``|attribution|`` on the positions holding ``token_id``.

    :math:`s_i = \sum_{t: x_{i,t} = k} |A_{i,t}| \,/\, \sum_t |A_{i,t}|`; NaN for samples without the token.

    Example:
        >>> token_share(torch.tensor([[0.5, -1.5], [1.0, 1.0]]), torch.tensor([[7, 3], [1, 2]]), 3).tolist()
        [0.75, nan]
    """
    if attributions.shape != input_ids.shape:
        raise ValueError(expected("attributions", f"the shape of input_ids {tuple(input_ids.shape)}", attributions))
    mag = attributions.detach().float().abs()
    hit = input_ids == token_id
    share = (mag * hit).sum(1) / mag.sum(1).clamp_min(1e-30)
    return torch.where(hit.any(1), share, torch.full_like(share, float("nan")))
