"""Gradient maps: saliency, input x gradient and the SmoothGrad family (SmoothGrad, SmoothGrad², VarGrad)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_xai._utils import Target, check_choice, check_positive_int, chunks
from lightning_xai.attribution._common import (
    DEFAULT_MAX_ROWS,
    Generator,
    check_bool,
    check_common,
    check_generator,
    check_non_negative_float,
    expanded_chunks,
    guarded,
    input_grad,
    make_generator,
    private_copy,
    resolve_target_chunked,
    row_target,
    spatial_view,
)

SMOOTHGRAD_KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


# --------------------------------------------------------------------------- saliency / input x gradient
def _gradient_validate_args(model: Any, inputs: Tensor, target: Target, batch_size: Optional[int]) -> None:
    check_common(model, inputs, target)
    check_positive_int("batch_size", batch_size, allow_none=True)


def _saliency_validate_args(model: Any, inputs: Tensor, target: Target, abs: Any,  # noqa: A002
                            batch_size: Any) -> None:
    _gradient_validate_args(model, inputs, target, batch_size)
    check_bool("abs", abs)


def _gradient_compute(model: Callable, inputs: Tensor, target: Target, batch_size: Optional[int],
                      post: Callable[[Tensor, Tensor], Tensor], method: str) -> Tensor:
    """``post(x, grads)`` of the input gradients of the target scores, ``batch_size`` rows per pass."""
    cap = batch_size or DEFAULT_MAX_ROWS
    with guarded(model, method):
        x = private_copy(inputs)
        if target is not None:  # None: each row's predicted class, read from the same forward pass
            target = resolve_target_chunked(model, x, target, cap)
        grads = torch.empty_like(x)
        for a, b in chunks(x.shape[0], cap):
            grads[a:b] = input_grad(model, x[a:b], row_target(target, slice(a, b)))[0]
        return post(x, grads).detach()  # inside the guards: a normal tensor even under inference_mode


def saliency(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Target = None,
    abs: bool = True,  # noqa: A002  (Captum's name)
    batch_size: Optional[int] = None,
) -> Tensor:
    r"""Saliency: the gradient of the target score with respect to the input.

    .. math:: A(x) = \left|\frac{\partial f_c(x)}{\partial x}\right|

    Simonyan et al., 2014, https://arxiv.org/abs/1312.6034. Equals Captum's ``Saliency``.

    The model runs in eval mode, every flag restored after (with a warning if it was in train mode).

    Args:
        model: an ``nn.Module`` or a callable mapping inputs ``(N, ...)`` to logits ``(N, classes)``.
        inputs: a float tensor ``(N, ...)``; never modified.
        target: a class index, a LongTensor ``(N,)``, None (each row's predicted class, taken from the
            same forward pass) or a callable mapping the output to one score per row.
        abs: return the absolute gradient (Captum's default) instead of the signed one.
        batch_size: rows per forward/backward pass (None: :data:`DEFAULT_MAX_ROWS`); the result does
            not depend on it.

    Returns:
        A detached tensor shaped like ``inputs``.

    Raises:
        TypeError, ValueError: for a bad argument; the message names it and what is accepted.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
        >>> saliency(model, torch.rand(2, 1, 4, 4), target=0).shape
        torch.Size([2, 1, 4, 4])
    """
    _saliency_validate_args(model, inputs, target, abs, batch_size)
    return _gradient_compute(model, inputs, target, batch_size, lambda x, g: g.abs() if abs else g, "saliency")


def input_x_gradient(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Target = None,
    batch_size: Optional[int] = None,
) -> Tensor:
    r"""Input x gradient: the gradient scaled elementwise by the input (signed).

    .. math:: A(x) = x \odot \frac{\partial f_c(x)}{\partial x}

    Shrikumar et al., 2016, https://arxiv.org/abs/1605.01713. Equals Captum's ``InputXGradient``.

    The model runs in eval mode, every flag restored after (with a warning if it was in train mode).

    Args:
        model: an ``nn.Module`` or a callable mapping inputs ``(N, ...)`` to logits ``(N, classes)``.
        inputs: a float tensor ``(N, ...)``; never modified.
        target: a class index, a LongTensor ``(N,)``, None (predicted class) or a callable.
        batch_size: rows per forward/backward pass (None: :data:`DEFAULT_MAX_ROWS`).

    Returns:
        A detached tensor shaped like ``inputs``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
        >>> input_x_gradient(model, torch.rand(2, 1, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """
    _gradient_validate_args(model, inputs, target, batch_size)
    return _gradient_compute(model, inputs, target, batch_size, lambda x, g: x * g, "input_x_gradient")


# --------------------------------------------------------------------------- SmoothGrad family
def _smoothgrad_validate_args(model: Any, inputs: Tensor, target: Target, samples: Any, noise: Any, kind: Any,
                              abs: Any, batch_size: Any, generator: Any = None) -> None:  # noqa: A002
    check_common(model, inputs, target)
    check_positive_int("samples", samples)
    check_non_negative_float("noise", noise)
    check_choice("kind", kind, SMOOTHGRAD_KINDS)
    check_bool("abs", abs)
    check_positive_int("batch_size", batch_size, allow_none=True)
    check_generator(generator, inputs.device)


def noise_scale(x: Tensor, noise: float) -> Tensor:
    """Per-sample noise standard deviation ``noise * (max - min)``, shaped ``(N, 1, ..., 1)``."""
    flat = x.flatten(1)
    return spatial_view(noise * (flat.amax(1) - flat.amin(1)), x.ndim)


def _smoothgrad_compute(model: Callable, inputs: Tensor, target: Target, samples: int, noise: float, kind: str,
                        generator: torch.Generator, abs: bool, batch_size: Optional[int]) -> Tensor:  # noqa: A002
    cap = batch_size or DEFAULT_MAX_ROWS
    n = inputs.shape[0]
    with guarded(model, "smoothgrad"):
        x = private_copy(inputs)
        target = resolve_target_chunked(model, x, target, cap)
        sigma = noise_scale(x, noise)  # (N, 1, ..., 1)
        # one standard-normal draw per noisy sample, shared by the batch: (samples, *inputs.shape[1:])
        eps = torch.randn((samples,) + tuple(x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        total = torch.zeros_like(x)
        total_sq = torch.zeros_like(x) if kind != "smoothgrad" else None
        for _, _, s, i in expanded_chunks(samples, n, cap, x.device):  # row = s * N + i
            rows = x[i] + sigma[i] * eps[s]  # (rows, *inputs.shape[1:])
            grad = input_grad(model, rows, row_target(target, i))[0]
            if abs:
                grad = grad.abs()
            total.index_add_(0, i, grad)
            if total_sq is not None:
                total_sq.index_add_(0, i, grad * grad)
        mean = total / samples
        if kind == "smoothgrad":
            return mean.detach()
        mean_sq = total_sq / samples  # type: ignore[operator]
        if kind == "smoothgrad_sq":
            return mean_sq.detach()
        return (mean_sq - mean * mean).detach()


def smoothgrad(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Target = None,
    samples: int = 16,
    noise: float = 0.15,
    kind: str = "smoothgrad",
    generator: Generator = None,
    abs: bool = True,  # noqa: A002
    batch_size: Optional[int] = None,
) -> Tensor:
    r"""SmoothGrad (and SmoothGrad², VarGrad): saliency averaged over noisy copies of the input.

    .. math:: A(x) = \frac{1}{S}\sum_{s=1}^{S} g(x + \sigma\epsilon_s),\quad
        g = \left|\nabla_x f_c\right|,\ \epsilon_s \sim \mathcal{N}(0, I),\
        \sigma = \mathrm{noise}\cdot(\max x - \min x)

    ``smoothgrad_sq`` averages :math:`g^2`; ``vargrad`` returns :math:`E[g^2] - E[g]^2`.
    Smilkov et al., 2017, https://arxiv.org/abs/1706.03825; VarGrad: Adebayo et al., 2018,
    https://arxiv.org/abs/1810.03307.

    Semantics follow Captum's ``NoiseTunnel(Saliency(model))`` with two deliberate differences:
    the noise level is *relative* to each input's value range (the paper's definition; Captum's
    ``stdevs`` is absolute), and the noise comes from a private generator. With ``abs=True``
    (Captum's default) the absolute value is taken of each noisy gradient *before* averaging.
    With ``noise=0`` the result equals :func:`saliency`.

    Noise: ``eps = torch.randn((samples, *inputs.shape[1:]), generator=generator)`` in the inputs'
    dtype and device, drawn once per call and shared by all samples of the batch (each scaled by its
    own :math:`\sigma`), so a sample's map does not depend on its batch-mates.

    The model runs in eval mode, every flag restored after (with a warning if it was in train mode).

    Args:
        model: an ``nn.Module`` or a callable mapping inputs ``(N, ...)`` to logits ``(N, classes)``.
        inputs: a float tensor ``(N, ...)``; never modified.
        target: a class index, a LongTensor ``(N,)``, None (predicted class of the clean input, one
            no-grad pass) or a callable mapping the output to one score per row.
        samples: number of noisy copies :math:`S`.
        noise: noise standard deviation as a fraction of each input's ``max - min``.
        kind: ``"smoothgrad"``, ``"smoothgrad_sq"`` or ``"vargrad"``.
        generator: a ``torch.Generator`` on the inputs' device, an int seed, or None (seed 0); the
            global RNG is never used.
        abs: take absolute gradients before aggregating.
        batch_size: rows (noisy copies x samples) per forward/backward pass (None:
            :data:`DEFAULT_MAX_ROWS`); the result does not depend on it.

    Returns:
        A detached tensor shaped like ``inputs``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
        >>> smoothgrad(model, torch.rand(2, 1, 4, 4), samples=4, kind="vargrad").shape
        torch.Size([2, 1, 4, 4])
    """
    _smoothgrad_validate_args(model, inputs, target, samples, noise, kind, abs, batch_size, generator)
    gen = make_generator(generator, inputs.device)
    return _smoothgrad_compute(model, inputs, target, samples, float(noise), kind, gen, abs, batch_size)
