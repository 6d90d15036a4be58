"""Image parametrisations: the tensors gradient ascent actually changes, and how they become images.

A :class:`Parametrization` is configured once (``FourierParam(decay_power=1.0)``) and built per render
call for a batch shape ``(K, C, H, W)``, a value range and a private ``torch.Generator``. Calling it
returns images ``(K, C, H, W)`` inside the value range (a sigmoid maps unconstrained values to
``[lo, hi]``), so the model never sees an input it could not get from its data.

- :class:`PixelParam`: one free value per pixel.
- :class:`FourierParam`: the image's spectrum, scaled by ``1 / f**decay_power`` so that Adam's equal
  steps per coefficient favour low frequencies (Olah et al., 2017, "preconditioning"), with colour
  decorrelation for RGB.
- :class:`GeneratorParam`: a code ``z`` of a user-supplied generator, ``X = G(z)`` (Nguyen et al., 2016).

This module imports torch only.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lightning_xai._utils import expected

Range = Tuple[Union[float, Tensor], Union[float, Tensor]]

# Square root of ImageNet's RGB channel covariance (a widely used constant, from Olah et al., 2017):
# columns mix decorrelated components back into RGB.
IMAGENET_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


def color_correlation(images: Tensor) -> Tensor:
    """Square root ``(C, C)`` of the channel covariance of ``images (N, C, H, W)``, for ``color_matrix=``.

    Decorrelated parameters multiplied by it have the data's colour statistics.
    """
    if images.ndim != 4:
        raise ValueError(expected("images", "a tensor of shape (N, C, H, W)", images))
    x = images.detach().double().transpose(0, 1).flatten(1)  # (C, N*H*W)
    cov = torch.cov(x)
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T).float()


def _range_tensors(value_range: Range, c: int, device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    lo, hi = (torch.as_tensor(v, dtype=dtype, device=device).reshape(-1) for v in value_range)
    if lo.numel() not in (1, c) or hi.numel() not in (1, c) or bool((hi <= lo).any()):
        raise ValueError(expected("value_range", f"(lo, hi) with lo < hi, scalars or {c} per channel",
                                  (lo.tolist(), hi.tolist())))
    return lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)


class Parametrization:
    """Base class: learnable tensors that produce a batch of images in the value range.

    Subclasses implement :meth:`build` (create the tensors), :meth:`parameters` and :meth:`__call__`;
    :meth:`after_step` runs after each optimiser step (code decay, clipping).
    """

    def build(self, shape: Tuple[int, int, int, int], value_range: Range, generator: torch.Generator,
              device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        raise NotImplementedError

    def parameters(self) -> List[Tensor]:
        raise NotImplementedError

    def __call__(self) -> Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook run after every optimiser step (in ``torch.no_grad``)."""

    def modules(self) -> List[nn.Module]:
        """Modules the parametrisation runs (kept frozen and in eval mode while rendering)."""
        return []


def _randn(shape: Sequence[int], generator: torch.Generator, std: float, device: torch.device,
           dtype: torch.dtype) -> Tensor:
    # drawn on the generator's device (CPU) so results do not depend on the model's device
    return (torch.randn(*shape, generator=generator, dtype=torch.float32) * std).to(device=device, dtype=dtype)


class _SigmoidImage(Parametrization):
    """Shared parts of pixel and Fourier images: grayscale/colour handling and the sigmoid to ``[lo, hi]``."""

    def __init__(self, sd: float, grayscale: bool, decorrelate: bool, color_matrix: Optional[Tensor]) -> None:
        if not isinstance(sd, (int, float)) or sd < 0:
            raise ValueError(expected("sd", "a non-negative float", sd))
        if color_matrix is not None and (not isinstance(color_matrix, Tensor) or color_matrix.ndim != 2
                                         or color_matrix.shape[0] != color_matrix.shape[1]):
            raise ValueError(expected("color_matrix", "a square tensor (C, C)", color_matrix))
        self.sd = float(sd)
        self.grayscale = grayscale
        self.decorrelate = decorrelate
        self.color_matrix = color_matrix
        self._c = 1
        self._mix: Optional[Tensor] = None

    def _setup_colour(self, c: int, value_range: Range, device: torch.device, dtype: torch.dtype) -> int:
        self._c = c
        self._lo, self._hi = _range_tensors(value_range, c, device, dtype)
        self._span = self._hi - self._lo
        self._unit = bool((self._lo == 0).all() and (self._hi == 1).all())
        self._mix = None
        if self.grayscale or c == 1 or not self.decorrelate:
            return 1 if self.grayscale else c
        if self.color_matrix is not None:
            if self.color_matrix.shape[0] != c:
                raise ValueError(expected("color_matrix", f"a ({c}, {c}) matrix", self.color_matrix))
            mix = self.color_matrix
        elif c == 3:
            mix = IMAGENET_COLOR_SQRT
        else:
            return c
        mix = mix / mix.norm(dim=0).max()  # largest column norm 1
        self._mix = mix.to(device=device, dtype=dtype)
        return c

    def _to_image(self, u: Tensor) -> Tensor:
        """Unconstrained ``(K, C', H, W)`` -> images ``(K, C, H, W)`` in ``[lo, hi]``."""
        if self._mix is not None:  # (C, C') @ (C', K * H * W): one matrix product (einsum's batched one is slower)
            k, c, h, w = u.shape
            u = (self._mix @ u.transpose(0, 1).reshape(c, -1)).view(-1, k, h, w).transpose(0, 1).contiguous()
        return self._squash(u)

    def _squash(self, u: Tensor) -> Tensor:
        """``lo + (hi - lo) * sigmoid(u)``, the grey channel repeated over ``C`` (the sigmoid alone for ``[0, 1]``)."""
        if u.shape[1] != self._c:
            u = u.expand(-1, self._c, -1, -1)
        x = torch.sigmoid(u)
        return x if self._unit else torch.addcmul(self._lo, self._span, x)


class PixelParam(_SigmoidImage):
    """One free value per pixel, ``X = lo + (hi - lo) * sigmoid(U)``.

    Args:
        sd: standard deviation of the random start (0.01 starts near mid-grey).
        grayscale: learn one channel and repeat it over the input channels.
        decorrelate: mix channels with ``color_matrix`` (or ImageNet's for RGB).
        color_matrix: ``(C, C)`` colour mixing, e.g. from :func:`color_correlation`.
    """

    def __init__(self, sd: float = 0.01, grayscale: bool = False, decorrelate: bool = False,
                 color_matrix: Optional[Tensor] = None) -> None:
        super().__init__(sd, grayscale, decorrelate, color_matrix)
        self.pixels: Optional[Tensor] = None

    def build(self, shape, value_range, generator, device, dtype=torch.float32) -> None:
        k, c, h, w = shape
        channels = self._setup_colour(c, value_range, device, dtype)
        self.pixels = _randn((k, channels, h, w), generator, self.sd, device, dtype).requires_grad_(True)

    def parameters(self) -> List[Tensor]:
        return [self.pixels]

    def __call__(self) -> Tensor:
        return self._to_image(self.pixels)


def _frequency_scale(h: int, w: int, decay_power: float) -> Tensor:
    """``1 / max(f, 1/max(h, w)) ** decay_power`` on the ``rfft2`` grid ``(h, w // 2 + 1)``, RMS 1."""
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    freq = (fy ** 2 + fx ** 2).sqrt()
    scale = freq.clamp_min(1.0 / max(h, w)) ** (-decay_power)
    return scale / scale.pow(2).mean().sqrt()


class FourierParam(_SigmoidImage):
    r"""The image's 2-D spectrum, scaled by :math:`1/f^{d}`, then ``irfft2``, colour mixing and a sigmoid.

    .. math:: X = lo + (hi - lo)\,\sigma\big(M\,\mathcal{F}^{-1}[S \odot \hat U]\big)
              = lo + (hi - lo)\,\sigma\big(\mathcal{F}^{-1}[S \odot M \hat U]\big),\quad S_f = f^{-d}

    Adam moves every coefficient of :math:`\hat U` at a similar rate, so low frequencies, scaled up by
    :math:`S`, change fastest and high-frequency noise stays small (Olah et al., 2017,
    https://distill.pub/2017/feature-visualization/). The colour matrix :math:`M` mixes channels at each frequency and
    the inverse transform acts on each channel alone, so the two commute (the second form): the spectrum is held
    channel-major, ``(C', K, H, W // 2 + 1, 2)``, and the mixing is one matrix product on it, with no transposes.

    Args:
        decay_power: exponent ``d`` of the ``1/f`` scaling (0 gives an orthonormal pixel basis).
        sd, grayscale, decorrelate, color_matrix: see :class:`PixelParam` (``decorrelate`` defaults on).
    """

    def __init__(self, decay_power: float = 1.0, sd: float = 0.01, grayscale: bool = False, decorrelate: bool = True,
                 color_matrix: Optional[Tensor] = None) -> None:
        super().__init__(sd, grayscale, decorrelate, color_matrix)
        if not isinstance(decay_power, (int, float)) or decay_power < 0:
            raise ValueError(expected("decay_power", "a non-negative float", decay_power))
        self.decay_power = float(decay_power)
        self.spectrum: Optional[Tensor] = None

    def build(self, shape, value_range, generator, device, dtype=torch.float32) -> None:
        k, c, h, w = shape
        channels = self._setup_colour(c, value_range, device, dtype)
        self._hw = (h, w)
        # (H, W//2+1, 2): the same scale for the real and the imaginary part, held in full (a product broadcast over
        # the last dimension is several times slower)
        scale = _frequency_scale(h, w, self.decay_power).to(device=device, dtype=dtype)
        self._scale = scale.unsqueeze(-1).expand(h, w // 2 + 1, 2).contiguous()
        # real and imaginary parts, drawn as (K, C', H, W//2+1, 2) and held channel-major, (C', K, H, W//2+1, 2)
        start = _randn((k, channels, h, w // 2 + 1, 2), generator, self.sd, device, dtype)
        self.spectrum = start.transpose(0, 1).contiguous().requires_grad_(True)

    def parameters(self) -> List[Tensor]:
        return [self.spectrum]

    def __call__(self) -> Tensor:
        spec = self.spectrum
        if self._mix is not None:  # (C, C') @ (C', K * H * (W//2+1) * 2)
            spec = (self._mix @ spec.view(spec.shape[0], -1)).view(-1, *spec.shape[1:])
        u = torch.fft.irfft2(torch.view_as_complex(spec * self._scale), s=self._hw, norm="ortho")  # (C, K, H, W)
        return self._squash(u.transpose(0, 1).contiguous())  # (K, C, H, W)


class GeneratorParam(Parametrization):
    r"""Optimise the code of a generator: :math:`z^* = \arg\max_z y_i(G(z))`, :math:`X^* = G(z^*)`.

    The generator acts as a learned prior (Nguyen et al., 2016, https://arxiv.org/abs/1605.09304):
    every image it can produce looks like data. The generator is kept frozen and in eval mode.

    Args:
        generator: a module or callable mapping codes ``(K, *code_shape)`` to images ``(K, C, H, W)``.
        code_shape: shape of one code, e.g. ``(16,)``.
        sd: standard deviation of the random start code.
        decay: multiply the code by this after each step (``1.0`` = off; DGN-AM uses 0.99).
        clip: ``(lo, hi)`` bounds for the code after each step (floats or tensors of ``code_shape``).
        clamp_output: clamp ``G(z)`` into the value range.
    """

    def __init__(self, generator: Callable[[Tensor], Tensor], code_shape: Sequence[int], sd: float = 1.0,
                 decay: float = 1.0, clip: Optional[Tuple[Any, Any]] = None, clamp_output: bool = True) -> None:
        if not callable(generator):
            raise TypeError(expected("generator", "a module or callable code -> image", type(generator).__name__))
        code_shape = (code_shape,) if isinstance(code_shape, int) else tuple(code_shape)
        if not code_shape or not all(isinstance(s, int) and s > 0 for s in code_shape):
            raise ValueError(expected("code_shape", "a tuple of positive ints", code_shape))
        if not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(expected("decay", "a float in (0, 1]", decay))
        self.generator = generator
        self.code_shape = code_shape
        self.sd = float(sd)
        self.decay = float(decay)
        self.clip = clip
        self.clamp_output = clamp_output
        self.code: Optional[Tensor] = None

    def build(self, shape, value_range, generator, device, dtype=torch.float32) -> None:
        k, c = shape[0], shape[1]
        self._lo, self._hi = _range_tensors(value_range, c, device, dtype)
        self._clip = None if self.clip is None else tuple(
            torch.as_tensor(v).to(device=device, dtype=dtype) for v in self.clip)
        code = _randn((k,) + self.code_shape, generator, self.sd, device, dtype)
        if self._clip is not None:
            code = torch.max(torch.min(code, self._clip[1]), self._clip[0])
        self.code = code.requires_grad_(True)

    def parameters(self) -> List[Tensor]:
        return [self.code]

    def __call__(self) -> Tensor:
        images = self.generator(self.code)
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError(expected("generator(code)", "images of shape (K, C, H, W)",
                             images if isinstance(images, Tensor) else type(images).__name__))
        if self.clamp_output:
            images = torch.max(torch.min(images, self._hi), self._lo)
        return images

    def after_step(self) -> None:
        if self.decay != 1.0:
            self.code.mul_(self.decay)
        if self._clip is not None:
            self.code.copy_(torch.max(torch.min(self.code, self._clip[1]), self._clip[0]))

    def modules(self) -> List[nn.Module]:
        return [self.generator] if isinstance(self.generator, nn.Module) else []


def make_param(param: Union[str, Parametrization]) -> Parametrization:
    """``"fourier"`` / ``"pixel"`` (default settings) or a :class:`Parametrization` instance."""
    if isinstance(param, Parametrization):
        return param
    if param == "fourier":
        return FourierParam()
    if param == "pixel":
        return PixelParam()
    raise ValueError(expected("param", "'fourier', 'pixel' or a Parametrization (e.g. GeneratorParam(...))", param))


__all__ = ["Parametrization", "PixelParam", "FourierParam", "GeneratorParam", "color_correlation", "make_param",
           "IMAGENET_COLOR_SQRT"]
