"""Integrated Gradients with float64 quadrature rules, chunked passes and several baselines."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import Target, check_choice, check_positive_int, expected
from lightning_xai.attribution._common import (
    DEFAULT_MAX_ROWS,
    Generator,
    as_baseline,
    check_bool,
    check_common,
    check_generator,
    expanded_chunks,
    forward_scores,
    guarded,
    input_grad,
    make_generator,
    private_copy,
    resolve_target_chunked,
    row_target,
    spatial_view,
)

IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
BASELINE_NAMES = ("blur", "uniform")
Baseline = Union[int, float, Tensor, str, Callable[[Tensor], Tensor]]


# --------------------------------------------------------------------------- quadrature
def quadrature(method: str, steps: int) -> Tuple[Tensor, Tensor]:
    r"""Nodes :math:`\alpha_k \in [0, 1]` and weights :math:`w_k` (float64) for :math:`\int_0^1 g(\alpha)d\alpha`.

    ``gausslegendre`` uses numpy's ``leggauss`` mapped to [0, 1] (exact for polynomials of degree
    ``2 * steps - 1``); ``riemann_left/right/middle`` use equal weights ``1 / steps`` at the left ends,
    right ends or midpoints of ``steps`` equal cells; ``riemann_trapezoid`` is the true trapezoid rule
    on ``steps`` equally spaced nodes including both ends (weights :math:`\frac{1}{2(n-1)}` at the
    ends and :math:`\frac{1}{n-1}` inside, summing to 1; Captum's ``riemann_trapezoid`` differs).

    Example:
        >>> alphas, weights = quadrature("riemann_trapezoid", 3)
        >>> alphas.tolist(), weights.tolist()
        ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    """
    check_choice("method", method, IG_METHODS)
    check_positive_int("steps", steps)
    n = steps
    k = torch.arange(n, dtype=torch.float64)
    if method == "gausslegendre":
        import numpy as np

        nodes, weights = np.polynomial.legendre.leggauss(n)
        return torch.from_numpy(0.5 * (nodes + 1.0)), torch.from_numpy(0.5 * weights)
    if method == "riemann_trapezoid":
        if n < 2:
            raise ValueError(expected("steps", "an int >= 2 for method='riemann_trapezoid'", steps))
        weights = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        weights[0] = weights[-1] = 0.5 / (n - 1)
        return k / (n - 1), weights
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return (k + offset) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)


# --------------------------------------------------------------------------- baselines
def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of the dims after the channel dim (``(N, C, L)`` or ``(N, C, H, W)``;
    ``(N, D)`` is blurred along ``D``), replicate padding, radius ``ceil(3 sigma)``."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=x.device, dtype=x.dtype)
    if x.ndim == 2:
        rows = x.unsqueeze(1)  # (N, 1, D)
    else:
        rows = x.reshape(x.shape[0] * x.shape[1], 1, *x.shape[2:])  # (N * C, 1, *spatial)
    spatial = rows.ndim - 2
    if spatial not in (1, 2):
        raise ValueError(expected("inputs", "(N, D), (N, C, L) or (N, C, H, W) for baseline='blur'", x))
    for dim in range(spatial):
        shape = [1, 1] + [1] * spatial
        shape[2 + dim] = kernel.numel()
        pad = [0, 0] * spatial
        pad[2 * (spatial - 1 - dim)] = pad[2 * (spatial - 1 - dim) + 1] = radius
        padded = F.pad(rows, pad, mode="replicate")
        rows = (F.conv1d if spatial == 1 else F.conv2d)(padded, kernel.view(shape))
    return rows.reshape(x.shape)


def make_baseline(baseline: Baseline, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """The baseline tensor ``(N, ...)`` for IG.

    * a number or a tensor broadcastable to the inputs;
    * ``"blur"``: the input blurred with a Gaussian of sigma = a quarter of its largest spatial side;
    * ``"uniform"``: ``min + (max - min) * U`` per sample, with one ``U ~ Uniform[0, 1)`` draw of shape
      ``inputs.shape[1:]`` from the private generator shared by the batch;
    * a callable ``baseline(inputs) -> tensor`` broadcastable to the inputs.
    """
    if isinstance(baseline, str):
        if baseline == "blur":
            sides = x.shape[2:] if x.ndim > 2 else x.shape[1:]
            return gaussian_blur(x, max(sides) / 4.0)
        u = torch.rand(tuple(x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        flat = x.flatten(1)
        low, high = spatial_view(flat.amin(1), x.ndim), spatial_view(flat.amax(1), x.ndim)
        return low + (high - low) * u
    if callable(baseline) and not isinstance(baseline, Tensor):
        out = baseline(x.clone())
        if not isinstance(out, Tensor):
            raise TypeError(expected("baseline(inputs)", "a tensor broadcastable to the inputs", type(out).__name__))
        return as_baseline(out, x, "baseline(inputs)")
    return as_baseline(baseline, x)


# --------------------------------------------------------------------------- IG
def _integrated_gradients_validate_args(model: Any, inputs: Tensor, target: Target, baseline: Any, steps: Any,
                                        method: Any, internal_batch_size: Any, return_delta: Any,
                                        generator: Any = None) -> None:
    check_common(model, inputs, target)
    check_positive_int("steps", steps)
    check_choice("method", method, IG_METHODS)
    if method == "riemann_trapezoid" and steps < 2:
        raise ValueError(expected("steps", "an int >= 2 for method='riemann_trapezoid'", steps))
    check_positive_int("internal_batch_size", internal_batch_size, allow_none=True)
    check_bool("return_delta", return_delta)
    if isinstance(baseline, str):
        check_choice("baseline", baseline, BASELINE_NAMES)
    elif isinstance(baseline, bool) or not (isinstance(baseline, (int, float, Tensor)) or callable(baseline)):
        raise TypeError(expected("baseline", "a number, a tensor, 'blur', 'uniform' or a callable inputs -> tensor",
                                 type(baseline).__name__))
    check_generator(generator, inputs.device)


def _integrated_gradients_compute(model: Callable, inputs: Tensor, target: Target, baseline: Baseline, steps: int,
                                  method: str, internal_batch_size: Optional[int], return_delta: bool,
                                  generator: Optional[torch.Generator]) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    cap = internal_batch_size or DEFAULT_MAX_ROWS
    n = inputs.shape[0]
    alphas, weights = (t.to(device=inputs.device, dtype=inputs.dtype) for t in quadrature(method, steps))
    with guarded(model, "integrated_gradients"):
        x = private_copy(inputs)
        base = make_baseline(baseline, x, generator)  # (N, ...)
        target = resolve_target_chunked(model, x, target, cap)
        diff = x - base
        total = torch.zeros_like(x)  # sum_k w_k * grad f(b + alpha_k (x - b)), per sample
        shape = (-1,) + (1,) * (x.ndim - 1)
        for _, _, k, i in expanded_chunks(steps, n, cap, x.device):  # step-major rows: row = k * N + i
            rows = base[i] + alphas[k].view(shape) * diff[i]  # (rows, *inputs.shape[1:])
            grad = input_grad(model, rows, row_target(target, i))[0]
            total.index_add_(0, i, grad * weights[k].view(shape))
        attr = diff * total
        if not return_delta:
            return attr.detach()
        gap = forward_scores(model, x, target, cap) - forward_scores(model, base, target, cap)
        delta = attr.flatten(1).sum(1) - gap
        return attr.detach(), delta.detach()


def integrated_gradients(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Target = None,
    baseline: Baseline = 0,
    steps: int = 32,
    method: str = "gausslegendre",
    internal_batch_size: Optional[int] = None,
    return_delta: bool = False,
    generator: Generator = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Integrated Gradients: the path integral of the gradient from a baseline to the input.

    .. math:: A(x) = (x - b) \odot \int_0^1 \nabla_x f_c\big(b + \alpha (x - b)\big)\, d\alpha
        \approx (x - b) \odot \sum_k w_k \nabla_x f_c\big(b + \alpha_k (x - b)\big)

    Sundararajan et al., 2017, https://arxiv.org/abs/1703.01365. Matches Captum's
    ``IntegratedGradients`` for ``gausslegendre`` and ``riemann_left/right/middle``; the nodes and
    weights are computed in float64 (see :func:`quadrature`) and cast to the inputs' dtype, so
    float64 inputs give float64-accurate results. ``riemann_trapezoid`` is the true trapezoid rule
    (Captum's version has weights summing to ``(n - 1) / n``).

    The model runs in eval mode, every flag restored after (with a warning if it was in train mode).

    Args:
        model: an ``nn.Module`` or a callable mapping inputs ``(N, ...)`` to logits ``(N, classes)``.
        inputs: a float tensor ``(N, ...)``; never modified.
        target: a class index, a LongTensor ``(N,)``, None (predicted class of the input, one no-grad
            pass) or a callable mapping the output to one score per row.
        baseline: a number, a tensor broadcastable to the inputs, ``"blur"`` (a Gaussian blur with
            sigma a quarter of the largest side), ``"uniform"`` (uniform noise in each input's range
            from ``generator``) or a callable ``inputs -> tensor``.
        steps: number of quadrature nodes (>= 2 for ``riemann_trapezoid``).
        method: ``"gausslegendre"``, ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"`` or
            ``"riemann_trapezoid"``.
        internal_batch_size: rows (steps x samples) per forward/backward pass (None:
            :data:`DEFAULT_MAX_ROWS`); any positive int, the result does not depend on it.
        return_delta: also return the completeness gap
            :math:`\delta = \sum A(x) - (f_c(x) - f_c(b))` per sample (two extra no-grad passes).
        generator: for ``baseline="uniform"``: a ``torch.Generator``, an int seed or None (seed 0).

    Returns:
        The attributions shaped like ``inputs`` (detached), or ``(attributions, delta)`` with
        ``delta`` of shape ``(N,)`` when ``return_delta=True``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
        >>> attr, delta = integrated_gradients(model, torch.rand(2, 1, 4, 4), target=1, return_delta=True)
        >>> attr.shape, bool(delta.abs().max() < 1e-5)
        (torch.Size([2, 1, 4, 4]), True)
    """
    _integrated_gradients_validate_args(model, inputs, target, baseline, steps, method, internal_batch_size,
                                        return_delta, generator)
    gen = make_generator(generator, inputs.device)  # used by baseline="uniform" only
    return _integrated_gradients_compute(model, inputs, target, baseline, steps, method, internal_batch_size,
                                         return_delta, gen)
