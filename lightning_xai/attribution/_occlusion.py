"""Occlusion: the drop in the target score when a sliding window of the input is replaced by a baseline."""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._utils import Target, check_positive_int, chunks, expected
from lightning_xai.attribution._common import (
    DEFAULT_MAX_ROWS,
    as_baseline,
    check_baseline,
    check_common,
    forward_scores,
    guarded,
    private_copy,
    resolve_target_chunked,
    scores_of,
    spatial_view,
)

Window = Union[None, int, Sequence[int]]


def _expand_spec(name: str, spec: Any, shape: Tuple[int, ...], fill: Tuple[int, ...]) -> Tuple[int, ...]:
    """An int or a tuple for the trailing dims -> one int per non-batch dim; leading dims get ``fill``."""
    trailing = max(1, len(shape) - 1)  # dims after the channel dim ((D,) for (N, D) inputs)
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = (spec,) * trailing
    if not isinstance(spec, (tuple, list)) or not spec or len(spec) > len(shape) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in spec):
        raise TypeError(expected(name, f"an int or a tuple of at most {len(shape)} ints (for the dims "
                                       f"{tuple(shape)}, counted from the last)", spec))
    spec = tuple(spec)
    return tuple(fill[: len(shape) - len(spec)]) + spec


def occlusion_windows(shape: Tuple[int, ...], window: Window = None, stride: Window = None
                      ) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Normalise ``window``/``stride`` for inputs whose non-batch shape is ``shape``.

    * ``window``: an int (every dim after the channel dim, e.g. H and W), a tuple for the trailing
      dims (``(kh, kw)``), or one int per non-batch dim (``(c, kh, kw)``, Captum's
      ``sliding_window_shapes``). Dims not given are covered fully (by default a window spans all
      channels). ``None``: ``max(2, ceil(side / 4))`` per trailing dim (capped at the side).
    * ``stride``: same forms; dims not given move by their full size (one position). ``None``:
      ``max(2, window // 2)`` per trailing dim (capped at the window), i.e. half-overlapping windows.

    Example:
        >>> occlusion_windows((1, 28, 28))
        ((1, 7, 7), (1, 3, 3))
    """
    shape = tuple(int(s) for s in shape)
    trailing = max(1, len(shape) - 1)
    if window is None:
        window = tuple(min(side, max(2, math.ceil(side / 4))) for side in shape[-trailing:])
    win = _expand_spec("window", window, shape, shape)
    if stride is None:
        stride = tuple(min(w, max(2, w // 2)) for w in win[-trailing:])
    strd = _expand_spec("stride", stride, shape, win)
    for d, (side, w, s) in enumerate(zip(shape, win, strd)):
        if not 1 <= w <= side:
            raise ValueError(expected("window", f"sizes in [1, {side}] for dim {d + 1} of the inputs", win))
        if not 1 <= s <= w and w != side:
            raise ValueError(expected("stride", f"steps in [1, window={w}] for dim {d + 1} of the inputs", strd))
        if s < 1:
            raise ValueError(expected("stride", "positive steps", strd))
    return win, strd


def _window_slices(shape: Tuple[int, ...], win: Tuple[int, ...], strd: Tuple[int, ...]) -> List[Tuple[slice, ...]]:
    """All window positions as slices over the non-batch dims, in Captum's order (first dim fastest).

    Like Captum, each dim has ``ceil((side - window) / stride) + 1`` positions; the last one may be
    cropped at the border, so every element is covered.
    """
    starts = [range(0, math.ceil((side - w) / s) * s + 1, s) if side > w else range(1)
              for side, w, s in zip(shape, win, strd)]
    out = []
    for pos in itertools.product(*reversed(starts)):
        pos = pos[::-1]
        out.append(tuple(slice(p, min(p + w, side)) for p, w, side in zip(pos, win, shape)))
    return out


def _occlusion_validate_args(model: Any, inputs: Tensor, target: Target, perturbations_per_eval: Any,
                             window: Any = None, stride: Any = None, baseline: Any = 0
                             ) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Check every argument; returns the normalised ``(window, stride)`` (:func:`occlusion_windows`)."""
    check_common(model, inputs, target)
    check_positive_int("perturbations_per_eval", perturbations_per_eval, allow_none=True)
    win, strd = occlusion_windows(tuple(inputs.shape[1:]), window, stride)
    check_baseline(baseline)
    return win, strd


def _occlusion_compute(model: Callable, inputs: Tensor, target: Target, win: Tuple[int, ...], strd: Tuple[int, ...],
                       baseline: Any, perturbations_per_eval: Optional[int]) -> Tensor:
    n = inputs.shape[0]
    shape = tuple(inputs.shape[1:])
    slices = _window_slices(shape, win, strd)
    per_eval = perturbations_per_eval or max(1, DEFAULT_MAX_ROWS // n)
    with guarded(model, "occlusion", grad=False):
        x = private_copy(inputs)
        base = as_baseline(baseline, x)
        target = resolve_target_chunked(model, x, target, max(n, DEFAULT_MAX_ROWS))
        clean = forward_scores(model, x, target, max(n, DEFAULT_MAX_ROWS))  # (N,)
        total = torch.zeros_like(x)
        counts = torch.zeros(shape, dtype=x.dtype, device=x.device)
        tiled_target = target.repeat(per_eval) if isinstance(target, Tensor) else target
        for a, b in chunks(len(slices), per_eval):
            rows = x.repeat(b - a, *([1] * len(shape)))  # (windows * N, *shape), window-major
            for j, sl in enumerate(slices[a:b]):
                rows[(slice(j * n, (j + 1) * n),) + sl] = base[(slice(None),) + sl]
            rows_target = tiled_target[: (b - a) * n] if isinstance(tiled_target, Tensor) else tiled_target
            drop = clean.repeat(b - a) - scores_of(model(rows), rows_target)  # (windows * N,)
            drop = spatial_view(drop, x.ndim)
            for j, sl in enumerate(slices[a:b]):
                total[(slice(None),) + sl] += drop[j * n:(j + 1) * n]
                counts[sl] += 1
        return (total / counts).detach()


def occlusion(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Target = None,
    window: Window = None,
    stride: Window = None,
    baseline: Union[float, Tensor] = 0,
    perturbations_per_eval: Optional[int] = None,
) -> Tensor:
    r"""Occlusion: each element gets the mean score drop over the windows that cover it.

    .. math:: A(x)_j = \frac{1}{|W_j|}\sum_{w \in W_j} \big(f_c(x) - f_c(x_{w \leftarrow b})\big)

    where :math:`W_j` are the window positions covering element :math:`j` and
    :math:`x_{w \leftarrow b}` is the input with window :math:`w` set to the baseline.
    Zeiler & Fergus, 2014, https://arxiv.org/abs/1311.2901. Same semantics (and, for the same window,
    stride and baseline, the same values) as Captum's ``Occlusion``; runs without autograd.

    The model runs in eval mode, every flag restored after (with a warning if it was in train mode).

    Args:
        model: an ``nn.Module`` or a callable mapping inputs ``(N, ...)`` to logits ``(N, classes)``.
        inputs: a float tensor ``(N, ...)``; never modified.
        target: a class index, a LongTensor ``(N,)``, None (predicted class of the input) or a
            callable mapping the output to one score per row.
        window: window size; an int (every dim after the channel dim), a tuple for the trailing dims
            or one int per non-batch dim. Dims not given are covered fully (a window spans all
            channels by default). None: a quarter of each side (at least 2). See
            :func:`occlusion_windows`.
        stride: window step, same forms; None: half the window (at least 2). Never 1 by default.
        baseline: the value occluded elements get: a number or a tensor broadcastable to the inputs.
        perturbations_per_eval: windows per forward pass (``windows x N`` rows); None: as many as
            fit in :data:`DEFAULT_MAX_ROWS` rows (at least one). The result does not depend on it.

    Returns:
        A detached tensor shaped like ``inputs``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
        >>> occlusion(model, torch.rand(2, 1, 4, 4), target=0, window=2, stride=2).shape
        torch.Size([2, 1, 4, 4])
    """
    win, strd = _occlusion_validate_args(model, inputs, target, perturbations_per_eval, window, stride, baseline)
    return _occlusion_compute(model, inputs, target, win, strd, baseline, perturbations_per_eval)
