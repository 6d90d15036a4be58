"""LIME for images: a weighted ridge surrogate fitted to the model's scores on random segment masks."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._utils import Target, check_positive_int, expected
from lightning_xai.attribution._common import (
    DEFAULT_MAX_ROWS,
    Generator,
    as_baseline,
    check_baseline,
    check_common,
    check_generator,
    check_non_negative_float,
    check_positive_float,
    expanded_chunks,
    guarded,
    make_generator,
    private_copy,
    resolve_target_chunked,
    scores_of,
)


def grid_segments(height: int, width: int, grid: Sequence[int] = (4, 4), device: Any = None) -> Tensor:
    """Labels ``(H, W)`` of a ``grid[0] x grid[1]`` grid of patches, numbered row by row.

    Example:
        >>> grid_segments(4, 4, (2, 2)).tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    """
    gh, gw = grid
    rows = torch.arange(height, device=device) * gh // height
    cols = torch.arange(width, device=device) * gw // width
    return rows.view(-1, 1) * gw + cols.view(1, -1)


def _lime_validate_args(model: Any, inputs: Tensor, target: Target, segments: Any, grid: Any, samples: Any,
                        kernel_width: Any, alpha: Any, batch_size: Any, baseline: Any = 0,
                        generator: Any = None) -> None:
    check_common(model, inputs, target, min_ndim=4)
    if inputs.ndim != 4:
        raise ValueError(expected("inputs", "images (N, C, H, W)", inputs))
    n, _, h, w = inputs.shape
    if segments is not None:
        if not isinstance(segments, Tensor):
            raise TypeError(expected("segments", "None or an integer tensor of labels (H, W) or (N, H, W)",
                                     type(segments).__name__))
        if segments.is_floating_point() or segments.is_complex() or segments.dtype == torch.bool:
            raise TypeError(expected("segments", "an integer tensor of labels", segments))
        if tuple(segments.shape) not in ((h, w), (n, h, w)):
            raise ValueError(expected("segments", f"labels of shape ({h}, {w}) or ({n}, {h}, {w})", segments))
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
            isinstance(g, int) and not isinstance(g, bool) and 1 <= g for g in grid)) or grid[0] > h or grid[1] > w:
        raise ValueError(expected("grid", f"a pair of ints (rows, cols) with 1 <= rows <= {h} and 1 <= cols <= {w}",
                                  grid if not isinstance(grid, str) else repr(grid)))
    check_positive_int("samples", samples)
    if samples < 2:
        raise ValueError(expected("samples", "an int >= 2", samples))
    check_positive_float("kernel_width", kernel_width)
    check_non_negative_float("alpha", alpha)
    check_positive_int("batch_size", batch_size, allow_none=True)
    check_baseline(baseline)
    check_generator(generator, inputs.device)


def _dense_labels(segments: Tensor) -> Tuple[Tensor, Tensor]:
    """Per sample, relabel ``(N, H, W)`` segments to ``0..S_i - 1``; also the valid-column mask ``(N, S)``."""
    dense = torch.empty_like(segments)
    counts = []
    for i in range(segments.shape[0]):
        _, inverse = torch.unique(segments[i], return_inverse=True)
        dense[i] = inverse
        counts.append(int(inverse.max()) + 1)
    s_max = max(counts)
    valid = torch.arange(s_max, device=segments.device).view(
        1, -1) < torch.tensor(counts, device=segments.device).view(-1, 1)
    return dense, valid


def fit_surrogate(z: Tensor, y: Tensor, valid: Tensor, kernel_width: float, alpha: float) -> Tensor:
    r"""LIME's weighted ridge fit, in float64.

    Args:
        z: binary masks ``(samples, S)`` (1 = segment kept).
        y: model scores ``(N, samples)``.
        valid: which of the ``S`` columns exist for each sample, ``(N, S)``.
        kernel_width: width of the exponential kernel on the cosine distance to the all-on mask,
            :math:`\pi = \exp(-d^2 / (2 w^2))` (LIME's ``sqrt(exp(-d^2 / w^2))``, Captum's Lime kernel).
        alpha: ridge penalty (the intercept is not penalised).

    Returns:
        Coefficients ``(N, S)`` (0 for invalid columns).
    """
    zf = z.to(torch.float64).unsqueeze(0) * valid.to(torch.float64).unsqueeze(1)  # (N, samples, S)
    on = zf.sum(-1)  # (N, samples)
    total = valid.to(torch.float64).sum(-1, keepdim=True)  # (N, 1)
    cosine = torch.where(on > 0, torch.sqrt(on / total), torch.zeros_like(on))
    pi = torch.exp(-((1.0 - cosine) ** 2) / (2.0 * kernel_width ** 2))  # (N, samples)
    yf = y.to(torch.float64)
    pw = pi / pi.sum(-1, keepdim=True)
    zc = zf - (pw.unsqueeze(-1) * zf).sum(1, keepdim=True)  # weighted centring -> intercept
    yc = yf - (pw * yf).sum(1, keepdim=True)
    gram = zc.transpose(1, 2) @ (pi.unsqueeze(-1) * zc)  # (N, S, S)
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    rhs = zc.transpose(1, 2) @ (pi * yc).unsqueeze(-1)  # (N, S, 1)
    # invalid columns are all-zero: the ridge term (at least 1e-12) keeps the system regular
    coef = torch.linalg.solve(gram + max(alpha, 1e-12) * eye, rhs).squeeze(-1)
    return coef * valid


def _lime_compute(model: Callable, inputs: Tensor, target: Target, segments: Optional[Tensor], grid: Sequence[int],
                  samples: int, kernel_width: float, baseline: Any, alpha: float, generator: torch.Generator,
                  batch_size: Optional[int]) -> Tensor:
    cap = batch_size or DEFAULT_MAX_ROWS
    n, _, h, w = inputs.shape
    with guarded(model, "lime", grad=False):
        x = private_copy(inputs)
        base = as_baseline(baseline, x)
        target = resolve_target_chunked(model, x, target, cap)
        if segments is None:
            segments = grid_segments(h, w, grid, x.device)
        segments = segments.to(x.device).expand(n, h, w)  # (N, H, W)
        labels, valid = _dense_labels(segments)
        s = valid.shape[1]
        # mask 0 keeps every segment (LIME's first sample); the rest are fair coin flips shared by the batch
        z = torch.ones(samples, s, dtype=torch.bool, device=x.device)
        z[1:] = torch.rand((samples - 1, s), generator=generator, device=x.device) < 0.5
        y = torch.empty(samples * n, dtype=x.dtype, device=x.device)
        for a, b, k, i in expanded_chunks(samples, n, cap, x.device):  # mask-major rows: row = k * N + i
            keep = z[k.view(-1, 1), labels[i].flatten(1)].view(-1, 1, h, w).to(x.dtype)  # (rows, 1, H, W)
            rows = base[i] + keep * (x[i] - base[i])
            y[a:b] = scores_of(model(rows), target[i] if isinstance(target, Tensor) else target)
        coef = fit_surrogate(z, y.view(samples, n).t(), valid, kernel_width, alpha)  # (N, S)
        attr = coef.gather(1, labels.flatten(1)).view(n, 1, h, w).to(x.dtype).expand_as(x)
        return attr.contiguous().detach()


def lime(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Target = None,
    segments: Optional[Tensor] = None,
    grid: Sequence[int] = (4, 4),
    samples: int = 256,
    kernel_width: float = 0.25,
    baseline: Union[float, Tensor] = 0,
    alpha: float = 1e-3,
    generator: Generator = None,
    batch_size: Optional[int] = None,
) -> Tensor:
    r"""LIME: a locally weighted linear surrogate over image segments; each segment gets its weight.

    .. math:: \hat\beta = \arg\min_{\beta, \beta_0} \sum_k \pi(z_k)\big(f_c(h(z_k)) - \beta_0 - z_k^\top\beta\big)^2
        + \alpha\lVert\beta\rVert^2,\quad \pi(z) = e^{-d_{\cos}(z, \mathbf 1)^2 / (2 w^2)}

    where :math:`h(z)` keeps the segments with :math:`z_s = 1` and sets the others to the baseline.
    Ribeiro et al., 2016, https://arxiv.org/abs/1602.04938.

    The first mask keeps every segment (as in LIME); the other ``samples - 1`` are fair coin flips
    ``torch.rand((samples - 1, S), generator=generator) < 0.5``, shared by the batch, so a sample's
    map does not depend on its batch-mates (for shared segments). The fit runs in float64.

    The model runs in eval mode, every flag restored after (with a warning if it was in train mode).

    Args:
        model: an ``nn.Module`` or a callable mapping inputs ``(N, C, H, W)`` to logits ``(N, classes)``.
        inputs: float images ``(N, C, H, W)``; never modified.
        target: a class index, a LongTensor ``(N,)``, None (predicted class) or a callable.
        segments: integer labels ``(H, W)`` (shared) or ``(N, H, W)``; None: a ``grid`` of patches.
        grid: ``(rows, cols)`` of the default patch grid.
        samples: number of masks, including the all-on one (>= 2).
        kernel_width: kernel width :math:`w` on the cosine distance (LIME's image default 0.25).
        baseline: value of removed segments: a number or a tensor broadcastable to the inputs.
        alpha: ridge penalty.
        generator: a ``torch.Generator`` on the inputs' device, an int seed or None (seed 0).
        batch_size: rows (masks x samples) per forward pass (None: :data:`DEFAULT_MAX_ROWS`).

    Returns:
        A detached tensor shaped like ``inputs``: each segment's coefficient painted over its pixels
        (the same value in every channel).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
        >>> lime(model, torch.rand(2, 1, 4, 4), target=0, grid=(2, 2), samples=32).shape
        torch.Size([2, 1, 4, 4])
    """
    _lime_validate_args(model, inputs, target, segments, grid, samples, kernel_width, alpha, batch_size, baseline,
                        generator)
    gen = make_generator(generator, inputs.device)
    return _lime_compute(model, inputs, target, segments, tuple(grid), samples, float(kernel_width), baseline,
                         float(alpha), gen, batch_size)
