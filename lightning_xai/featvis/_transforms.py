r"""Random transforms (robustness priors) and regularisers (image priors) for feature visualisation.

Transforms are applied to the image before each forward pass, so the optimum must survive small
shifts, scalings and rotations; this removes most adversarial high-frequency patterns (Olah et al.,
2017). Each transform is a callable ``t(images, generator) -> images`` that draws its randomness from
the private ``torch.Generator`` it is given (never the global RNG); geometric ones use
``F.affine_grid`` / ``F.grid_sample`` and keep the image size, one random draw per image.

Regularisers see the image rescaled to ``[0, 1]`` by the value range (so ``L1`` pulls towards the
range's low end, e.g. black) and return one penalty per image ``(K,)``, already weighted and averaged
over pixels, so a weight means the same for any value range and at 8x8 or 224x224:

.. math:: \mathcal{L} = -\text{objective}(T(X)) + \sum_r \lambda_r R_r(X)

This module imports torch only.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import expected

Transform = Callable[[Tensor, torch.Generator], Tensor]


Affine = Tuple[float, float, float, float, float, float]  # [[a, b, tx], [c, d, ty]] of one image


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> List[float]:
    return [lo + (hi - lo) * u for u in torch.rand(n, generator=generator, dtype=torch.float32).tolist()]


@functools.lru_cache(maxsize=16)
def _base_grid(h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(H * W, 3)``: each output pixel's centre in normalised coordinates ``(x, y, 1)`` (``align_corners=False``)."""
    xs = (torch.arange(w, dtype=dtype, device=device) * 2 + 1) / w - 1  # (W,)
    ys = (torch.arange(h, dtype=dtype, device=device) * 2 + 1) / h - 1  # (H,)
    return torch.stack([xs.expand(h, w), ys.view(-1, 1).expand(h, w), torch.ones(h, w, dtype=dtype, device=device)],
                       dim=-1).view(h * w, 3)


def _affine(images: Tensor, theta: Tensor, padding_mode: str) -> Tensor:
    """Resample ``images (K, C, H, W)`` with per-image affine matrices ``theta (K, 2, 3)``.

    The sampling grid is ``F.affine_grid``'s, computed as one ``(H * W, 3) @ (3, K * 2)`` product (``affine_grid``'s
    batched product of 3-column matrices is several times slower on CPU).
    """
    k, _, h, w = images.shape
    base = _base_grid(h, w, images.dtype, images.device)
    grid = (base @ theta.reshape(k * 2, 3).t()).view(h, w, k, 2).permute(2, 0, 1, 3)  # (K, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _as_theta(matrices: Sequence[Affine], like: Tensor) -> Tensor:
    """``(K, 2, 3)`` on the device and in the dtype of ``like``, from one :data:`Affine` per image."""
    return torch.tensor(matrices, dtype=like.dtype, device=like.device).view(-1, 2, 3)


def _check_padding_mode(mode: str) -> None:
    if mode not in ("zeros", "border", "reflection"):
        raise ValueError(expected("padding_mode", "one of 'zeros', 'border', 'reflection'", mode))


class _Affine:
    """A random resampling by per-image affine matrices: :meth:`draw` draws them as Python floats (``None``: the
    identity, nothing drawn), :meth:`theta` as a tensor. In a :class:`Compose`, consecutive ones with the same padding
    mode are resampled once."""

    padding_mode = "reflection"

    def draw(self, k: int, h: int, w: int, generator: torch.Generator) -> Optional[List[Affine]]:
        raise NotImplementedError

    def theta(self, images: Tensor, generator: torch.Generator) -> Optional[Tensor]:
        k, _, h, w = images.shape
        matrices = self.draw(k, h, w, generator)
        return None if matrices is None else _as_theta(matrices, images)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        theta = self.theta(images, generator)
        return images if theta is None else _affine(images, theta, self.padding_mode)


def _then(first: Affine, second: Affine) -> Affine:
    """The matrix of resampling by ``first`` and then by ``second``: output pixel ``p`` reads the first input at
    ``first [second p; 1]``, so ``[M1 M2 | M1 b2 + b1]``."""
    a1, b1, x1, c1, d1, y1 = first
    a2, b2, x2, c2, d2, y2 = second
    return (a1 * a2 + b1 * c2, a1 * b2 + b1 * d2, a1 * x2 + b1 * y2 + x1,
            c1 * a2 + d1 * c2, c1 * b2 + d1 * d2, c1 * x2 + d1 * y2 + y1)


class Jitter(_Affine):
    """Shift each image by a random whole number of pixels in ``[-pixels, pixels]`` along each axis."""

    def __init__(self, pixels: int = 1, padding_mode: str = "reflection") -> None:
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
            raise ValueError(expected("pixels", "a non-negative int", pixels))
        _check_padding_mode(padding_mode)
        self.pixels = pixels
        self.padding_mode = padding_mode

    def draw(self, k: int, h: int, w: int, generator: torch.Generator) -> Optional[List[Affine]]:
        if self.pixels == 0:
            return None
        shifts = torch.randint(-self.pixels, self.pixels + 1, (k, 2), generator=generator).tolist()  # (K, 2) px
        return [(1.0, 0.0, sx * 2.0 / w, 0.0, 1.0, sy * 2.0 / h) for sx, sy in shifts]  # the image spans 2

    def __repr__(self) -> str:
        return f"Jitter({self.pixels})"


class RandomScale(_Affine):
    """Zoom each image by a random factor in ``scales = (lo, hi)`` about its centre."""

    def __init__(self, scales: Tuple[float, float] = (0.9, 1.1), padding_mode: str = "reflection") -> None:
        if not (isinstance(scales, (tuple, list)) and len(scales) == 2 and 0 < scales[0] <= scales[1]):
            raise ValueError(expected("scales", "a pair 0 < lo <= hi", scales))
        _check_padding_mode(padding_mode)
        self.scales = (float(scales[0]), float(scales[1]))
        self.padding_mode = padding_mode

    def draw(self, k: int, h: int, w: int, generator: torch.Generator) -> List[Affine]:
        return [(1.0 / s, 0.0, 0.0, 0.0, 1.0 / s, 0.0) for s in _uniform(k, *self.scales, generator)]

    def __repr__(self) -> str:
        return f"RandomScale({self.scales})"


class RandomRotate(_Affine):
    """Rotate each image by a random angle in ``[-degrees, degrees]`` about its centre."""

    def __init__(self, degrees: float = 10.0, padding_mode: str = "reflection") -> None:
        if not isinstance(degrees, (int, float)) or degrees < 0:
            raise ValueError(expected("degrees", "a non-negative float", degrees))
        _check_padding_mode(padding_mode)
        self.degrees = float(degrees)
        self.padding_mode = padding_mode

    def draw(self, k: int, h: int, w: int, generator: torch.Generator) -> List[Affine]:
        out = []
        for a in _uniform(k, -self.degrees, self.degrees, generator):
            cos, sin = math.cos(math.radians(a)), math.sin(math.radians(a))
            out.append((cos, -sin, 0.0, sin, cos, 0.0))
        return out

    def __repr__(self) -> str:
        return f"RandomRotate({self.degrees})"


class Pad:
    """Pad every side by ``pixels`` with a constant ``value`` (or ``mode="reflect"``); the image grows.

    Use it before jitter so the optimised content can move towards the border; the model must accept
    the larger input (e.g. it ends in global pooling).
    """

    def __init__(self, pixels: int, value: float = 0.5, mode: str = "constant") -> None:
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
            raise ValueError(expected("pixels", "a non-negative int", pixels))
        if mode not in ("constant", "reflect", "replicate"):
            raise ValueError(expected("mode", "one of 'constant', 'reflect', 'replicate'", mode))
        self.pixels, self.value, self.mode = pixels, float(value), mode

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        p = self.pixels
        if p == 0:
            return images
        if self.mode == "constant":
            return F.pad(images, (p, p, p, p), mode="constant", value=self.value)
        return F.pad(images, (p, p, p, p), mode=self.mode)

    def __repr__(self) -> str:
        return f"Pad({self.pixels})"


class Compose:
    r"""Apply transforms in order.

    Consecutive affine transforms (:class:`Jitter`, :class:`RandomScale`, :class:`RandomRotate`) with the same padding
    mode are resampled once, with the product of their matrices (each drawn as if applied alone, in order; the few
    numbers per image are drawn and multiplied as Python floats, then made one tensor):

    .. math:: T_n \circ \dots \circ T_1 (X)(p) = X\big(A_1 \cdots A_n\, p\big)

    The same random geometric transform as applying them one by one, and one bilinear interpolation instead of one
    per transform (less blur), so the only differences are that blur and where a sample falls outside the image:
    the padding mode then mirrors (or clamps) the composed position once rather than at every step.
    """

    def __init__(self, transforms: Sequence[Transform]) -> None:
        for t in transforms:
            if not callable(t):
                raise TypeError(expected("transforms", "callables (images, generator) -> images", type(t).__name__))
        self.transforms = list(transforms)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        pending: Optional[List[Affine]] = None  # the affine transforms not resampled yet, one matrix per image
        mode = ""
        for t in self.transforms:
            affine = isinstance(t, _Affine) and type(t).__call__ is _Affine.__call__  # not one with its own __call__
            if pending is not None and not (affine and t.padding_mode == mode):
                images, pending = _affine(images, _as_theta(pending, images), mode), None
            if affine:
                drawn = _drawn_matrices(t, images, generator)
                if drawn is not None:
                    pending = drawn if pending is None else [_then(p, d) for p, d in zip(pending, drawn)]
                    mode = t.padding_mode
            else:
                images = t(images, generator)
        return images if pending is None else _affine(images, _as_theta(pending, images), mode)

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def _drawn_matrices(t: _Affine, images: Tensor, generator: torch.Generator) -> Optional[List[Affine]]:
    """``t``'s matrices as Python floats: from :meth:`_Affine.draw`, or from ``theta`` where a subclass overrides it."""
    if type(t).theta is _Affine.theta:
        k, _, h, w = images.shape
        return t.draw(k, h, w, generator)
    theta = t.theta(images, generator)
    return None if theta is None else [tuple(m) for m in theta.reshape(-1, 6).tolist()]


def default_transforms(height: int, width: int) -> List[Transform]:
    """Transforms sized to the image: 1-pixel jitter below 16 px; lucid-like jitter, scale and rotation above."""
    side = min(height, width)
    if side < 16:
        return [Jitter(1)]
    return [Jitter(max(1, side // 16)), RandomScale((0.95, 1.05)), RandomRotate(5.0), Jitter(max(1, side // 32))]


# --------------------------------------------------------------------------- regularisers
class Regularizer:
    """Base class: ``penalty(images (K, C, H, W) in [0, 1]) -> (K,)``, multiplied by ``weight``.

    :meth:`penalty_and_grad` gives the weighted penalty and its gradient with respect to the images; the built-in
    ones compute it in closed form (no autograd graph), a subclass that only defines :meth:`penalty` through autograd.
    """

    def __init__(self, weight: float) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(expected("weight", "a non-negative float", weight))
        self.weight = float(weight)

    def penalty(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, images: Tensor) -> Tensor:
        return self.weight * self.penalty(images)

    def penalty_and_grad(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """``(self(images) (K,), its gradient with respect to images (K, C, H, W))``, both detached."""
        return _autograd_penalty_and_grad(self, images)

    def _closed_form_applies(self, cls: type) -> bool:
        """Whether ``cls``'s closed-form gradient is this object's: no subclass changed its penalty."""
        return type(self).penalty is cls.penalty and type(self).__call__ is Regularizer.__call__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight})"


def _autograd_penalty_and_grad(reg: Regularizer, images: Tensor) -> Tuple[Tensor, Tensor]:
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        value = reg(x)
        grad, = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


class L1(Regularizer):
    r"""Sparsity, :math:`\frac{1}{CHW}\sum |X - c|` (the lecture's prior :math:`R(X) = -\sum |X_{ij}|`, with
    ``c = 0``)."""

    def __init__(self, weight: float = 0.05, center: float = 0.0) -> None:
        super().__init__(weight)
        self.center = float(center)

    def penalty(self, images: Tensor) -> Tensor:
        return (images - self.center).abs().flatten(1).mean(1)

    def penalty_and_grad(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        r"""The gradient is :math:`\frac{w}{CHW}\,\mathrm{sign}(X - c)` (0 where ``X = c``, as autograd's)."""
        if not self._closed_form_applies(L1):
            return _autograd_penalty_and_grad(self, images)
        d = images.detach() - self.center if self.center else images.detach()
        scale = self.weight / images[0].numel()
        return d.abs().flatten(1).sum(1).mul_(scale), d.sign().mul_(scale)


class L2(Regularizer):
    r"""L2 decay, :math:`\frac{1}{CHW}\sum (X - c)^2` (Yosinski et al., 2015)."""

    def __init__(self, weight: float = 0.05, center: float = 0.0) -> None:
        super().__init__(weight)
        self.center = float(center)

    def penalty(self, images: Tensor) -> Tensor:
        return (images - self.center).pow(2).flatten(1).mean(1)

    def penalty_and_grad(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        r"""The gradient is :math:`\frac{2w}{CHW}(X - c)`."""
        if not self._closed_form_applies(L2):
            return _autograd_penalty_and_grad(self, images)
        d = images.detach() - self.center
        scale = self.weight / images[0].numel()
        return d.pow(2).flatten(1).sum(1).mul_(scale), d.mul_(2 * scale)


class TotalVariation(Regularizer):
    r"""Anisotropic total variation, :math:`\frac{1}{CHW}\sum |X_{i+1,j} - X_{ij}| + |X_{i,j+1} - X_{ij}|`."""

    def __init__(self, weight: float = 0.05) -> None:
        super().__init__(weight)

    def penalty(self, images: Tensor) -> Tensor:
        dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().flatten(1).sum(1)
        dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().flatten(1).sum(1)
        return (dx + dy) / images[0].numel()

    def penalty_and_grad(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        r"""With :math:`s^y_{ij} = \mathrm{sign}(X_{i+1,j} - X_{ij})` and :math:`s^x` alike, the gradient at
        :math:`X_{ij}` is :math:`\frac{w}{CHW}(s^y_{i-1,j} - s^y_{ij} + s^x_{i,j-1} - s^x_{ij})`, each :math:`s`
        outside the image taken as 0 (and ``sign(0) = 0``, as autograd's)."""
        if not self._closed_form_applies(TotalVariation):
            return _autograd_penalty_and_grad(self, images)
        x = images.detach()
        scale = self.weight / x[0].numel()
        dy = x[:, :, 1:] - x[:, :, :-1]  # (K, C, H - 1, W)
        dx = x[..., 1:] - x[..., :-1]  # (K, C, H, W - 1)
        value = (dy.abs().sum((1, 2, 3)) + dx.abs().sum((1, 2, 3))).mul_(scale)
        sy, sx = dy.sign_(), dx.sign_()
        grad = torch.zeros_like(x)
        grad[:, :, 1:].add_(sy)  # in place on views (`grad[...] += s` would also copy the result back)
        grad[:, :, :-1].sub_(sy)
        grad[..., 1:].add_(sx)
        grad[..., :-1].sub_(sx)
        grad.mul_(scale)
        return value, grad


def gaussian_blur(images: Tensor, sigma: float = 0.5) -> Tensor:
    """Separable Gaussian blur (3-sigma kernel, reflect padding) of ``(K, C, H, W)``."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    pad_mode = "reflect" if min(images.shape[-2:]) > radius else "replicate"
    x = F.pad(images, (radius, radius, radius, radius), mode=pad_mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


class Blur(Regularizer):
    r"""Pull the image towards its own blur, :math:`\frac{1}{2CHW}\sum (X - \mathrm{sg}[G_\sigma * X])^2`.

    Its gradient, ``X - blur(X)``, is the step of Yosinski et al.'s periodic Gaussian blur, applied
    smoothly at every step.
    """

    def __init__(self, weight: float = 0.1, sigma: float = 0.5) -> None:
        super().__init__(weight)
        if not isinstance(sigma, (int, float)) or sigma <= 0:
            raise ValueError(expected("sigma", "a positive float", sigma))
        self.sigma = float(sigma)

    def penalty(self, images: Tensor) -> Tensor:
        target = gaussian_blur(images.detach(), self.sigma)
        return 0.5 * (images - target).pow(2).flatten(1).mean(1)

    def penalty_and_grad(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        r"""The gradient is :math:`\frac{w}{CHW}(X - G_\sigma * X)` (the blur is held fixed)."""
        if not self._closed_form_applies(Blur):
            return _autograd_penalty_and_grad(self, images)
        d = images.detach() - gaussian_blur(images.detach(), self.sigma)
        scale = self.weight / images[0].numel()
        return d.pow(2).flatten(1).sum(1).mul_(0.5 * scale), d.mul_(scale)


def default_regularizers() -> List[Regularizer]:
    """L1 towards the value range's low end plus total variation (the digits run in the design notes)."""
    return [L1(0.05), TotalVariation(0.05)]


RegularizerLike = Union[Regularizer, Callable[[Tensor], Tensor]]
