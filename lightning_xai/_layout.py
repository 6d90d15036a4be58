"""Channels-last memory format for the explanation passes of convolutional models on CPU.

A 2-D convolutional network on CPU can run twice as fast on channels-last (NHWC) inputs as on the default
NCHW layout: oneDNN's convolutions and max-pooling work natively in NHWC, while NCHW tensors are reordered at every
layer. A trainer keeps the model's layout, so the explanation passes (thousands of rows per run) pay that reordering
unless they choose otherwise. The values are the same numbers in another order; only floating-point summation order
differs.

Not every model gains: the reordering is what channels-last saves, and a model of a few small layers, or one
without spatial work after its first layer (a vision transformer's patch embedding), runs as fast or slower. And a
model may depend on the layout (``x.view(n, -1)`` after a convolution fails on a channels-last tensor). So
:func:`choose` decides on the inputs themselves: it runs :data:`CHECK_ROWS` rows both ways, accepts channels-last
only when nothing raises, every output agrees to a relative :data:`RTOL` (the rounding of a float32 network is
orders of magnitude below that; a layout-dependent model is off by O(1) or fails), and its forward takes at most
:data:`GAIN` of the default layout's time (the best of :data:`TIMINGS` timings each way, after the comparison's runs
warmed both up). Timing on 16 rows misses some gains that batches of 32-128 show (bench/layout.py), and where the
two layouts are within noise the model keeps its own. See docs/design.md.

This module imports torch only (no Lightning).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

#: Rows of the inputs :func:`choose` runs both ways.
CHECK_ROWS = 16
#: Timed forwards each way in :func:`choose` (the best one counts): a forward of a small model takes a tenth of a
#: millisecond, where one scheduler tick decides a single timing.
TIMINGS = 5
#: Forwards of :data:`CHECK_ROWS` rows one :func:`agrees` takes: one in each layout.
AGREE_PASSES = 2
#: Forwards of :data:`CHECK_ROWS` rows one :func:`choose` takes: the comparison and the timings.
CHECK_PASSES = AGREE_PASSES + 2 * TIMINGS
#: Relative tolerance of :func:`agrees` (float32 rounding of a deep network is about 1e-6 relative).
RTOL = 1e-3
#: Channels-last must take at most this share of the default layout's time: a gain under 10 % is within the
#: noise of a best-of-five timing of a small model, and then the model keeps its own layout.
GAIN = 0.9


class _ToChannelsLast(torch.autograd.Function):
    """``x`` in channels-last layout; its gradient comes back in the default (contiguous) layout."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        return _in_channels_last(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.contiguous()


def channels_last(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) in channels-last memory format, the same values; gradients flow back to ``x`` in the
    default layout, so what callers read (input gradients, attribution maps) is laid out as always.

    Example:
        >>> x = torch.arange(24.0).view(1, 2, 3, 4).requires_grad_()
        >>> y = channels_last(x)
        >>> y.is_contiguous(memory_format=torch.channels_last), torch.equal(y, x)
        (True, True)
        >>> torch.autograd.grad(y.sum(), x)[0].is_contiguous()
        True
    """
    return _ToChannelsLast.apply(x)  # type: ignore[no-any-return]


def eligible(module: Any, x: Any) -> bool:
    """Whether channels-last can help: ``x`` is a 4-D floating-point CPU tensor and ``module`` holds a 2-D
    convolution (a model without one has nothing to gain from the layout)."""
    return (isinstance(x, Tensor) and x.ndim == 4 and x.is_floating_point() and x.device.type == "cpu"
            and isinstance(module, nn.Module) and any(isinstance(m, nn.Conv2d) for m in module.modules()))


def _leaves(out: Any) -> list:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    return []


def _close(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    a, b = a.detach().double(), b.detach().double()
    scale = float(a[torch.isfinite(a)].abs().max()) if bool(torch.isfinite(a).any()) else 0.0
    return torch.allclose(a, b, rtol=RTOL, atol=RTOL * max(scale, 1e-30), equal_nan=True)


def _in_channels_last(x: Tensor) -> Tensor:
    # with one channel, NCHW strides already satisfy channels-last and a convolution keeps NCHW; these strides
    # (same values, same memory) make it produce channels-last
    if x.shape[1] == 1:
        _, _, h, w = x.shape
        return torch.empty_strided(x.shape, (h * w, 1, w, 1), dtype=x.dtype, device=x.device).copy_(x)
    return x.clone(memory_format=torch.channels_last)


def agrees(run: Callable[[Tensor], Any], x: Tensor, rows: int = CHECK_ROWS) -> bool:
    """Whether ``run`` gives the same outputs on the first ``rows`` rows of ``x`` in channels-last layout as in
    ``x``'s own: no exception, the same tensors (every tensor of a tuple, list or dict output; integer ones equal,
    floating ones within :data:`RTOL` of the largest finite magnitude). Runs without gradients; the caller holds
    the model in the state it explains (eval mode, hooks as they will be)."""
    part = x[:rows].detach()
    with torch.no_grad():
        try:
            ref = _leaves(run(part.contiguous()))
            got = _leaves(run(_in_channels_last(part)))
        except Exception:  # noqa: BLE001 - any failure means the model depends on the layout
            return False
    return len(ref) == len(got) > 0 and all(_close(a, b) for a, b in zip(ref, got))


def choose(run: Callable[[Tensor], Any], x: Tensor, rows: int = CHECK_ROWS) -> bool:
    """Whether to run ``run`` on inputs like ``x`` in channels-last layout: :func:`agrees`, and the forward of the
    first ``rows`` rows takes at most :data:`GAIN` of the default layout's time (best of :data:`TIMINGS` timings
    each way, alternating). :data:`CHECK_PASSES` forwards in all."""
    if not agrees(run, x, rows):
        return False
    part = x[:rows].detach().contiguous()
    fast = _in_channels_last(part)
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        for _ in range(TIMINGS):
            for i, inputs in enumerate((part, fast)):
                start = time.perf_counter()
                run(inputs)
                best[i] = min(best[i], time.perf_counter() - start)
    return best[1] <= GAIN * best[0]
