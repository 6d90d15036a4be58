"""Planted-shortcut variants of scikit-learn's digits, generated locally (nothing downloads).

Each variant plants a spurious feature that predicts the label in the training split, the digits
analogue of a famous shortcut:

* ``"corner_intensity"``: a 2x2 mark in the top-left corner whose brightness encodes the class
  (Decoy MNIST, Ross et al. 2017).
* ``"random_corner"``: the same mark in a random corner per image (a non-linear shortcut).
* ``"watermark"``: a small tag on a share of class 0 only (PASCAL VOC's horse source tag).
* ``"background"``: the background brightness encodes the class (the black PNG backgrounds).

``shortcut`` chooses what a split carries: ``"planted"`` (the mark encodes the label),
``"random"`` (the mark is there but its code is random: validation "without the shortcut") or
``"none"`` (no mark at all). ``load_digits`` needs scikit-learn (the ``demo`` extra).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from lightning_xai._utils import check_choice, expected

__all__ = ["MODES", "NUM_CLASSES", "VARIANTS", "ShortcutData", "load_digits_tensors", "plant", "region_mask",
           "shortcut_digits", "split_indices"]

VARIANTS = ("corner_intensity", "random_corner", "watermark", "background")
MODES = ("planted", "random", "none")
NUM_CLASSES = 10
_MARK = 2  # side of the corner mark, pixels (8x8 images)
_TAG = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])  # watermark pattern


@dataclass
class ShortcutData:
    """One split: images ``x (N, 1, 8, 8)`` in ``[0, 1]``, labels ``y (N,)``, the shortcut's pixels
    ``mask (N, 8, 8)`` (where the mark is, or would be) and ``marked (N,)`` (whether it carries the mark)."""

    x: Tensor
    y: Tensor
    mask: Tensor
    marked: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def tensors(self) -> Tuple[Tensor, Tensor]:
        return self.x, self.y


def load_digits_tensors() -> Tuple[Tensor, Tensor]:
    """All 1,797 digits as ``(N, 1, 8, 8)`` floats in ``[0, 1]`` and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "The digits data needs scikit-learn: `pip install scikit-learn` (or the `demo` extra).") from err
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def split_indices(n: int, val_fraction: float = 0.3, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """A seeded permutation split into train and validation indices."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def _code(y: Tensor) -> Tensor:
    """Brightness code of a class: 0.1 for class 9 up to 1.0 for class 0."""
    return 1.0 - 0.1 * y.float()


def plant(
    x: Tensor,
    y: Tensor,
    variant: str = "corner_intensity",
    shortcut: str = "planted",
    noise: float = 0.0,
    watermark_share: float = 0.6,
    watermark_class: int = 0,
    seed: int = 0,
    mark: int = _MARK,
) -> ShortcutData:
    """Plant a shortcut into digit images (a new tensor; ``x`` is not modified).

    Args:
        x: images ``(N, 1, H, W)`` in ``[0, 1]``; y: labels ``(N,)``.
        variant: one of :data:`VARIANTS`.
        shortcut: one of :data:`MODES`.
        noise: std of Gaussian pixel noise added before planting (makes the digits harder than the mark).
        watermark_share: share of ``watermark_class`` images that carry the tag (``"watermark"``).
        watermark_class: the class the tag marks.
        seed: seed of a private generator (the global RNG is not used).
        mark: side of the corner mark in pixels (``"corner_intensity"``, ``"random_corner"``; default 2).
    """
    check_choice("variant", variant, VARIANTS)
    check_choice("shortcut", shortcut, MODES)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(expected("x", "images of shape (N, 1, H, W)", x))
    if isinstance(mark, bool) or not isinstance(mark, int) or not 0 < mark <= min(x.shape[-2:]) // 2:
        raise ValueError(expected("mark", f"an int in [1, {min(x.shape[-2:]) // 2}]", mark))
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    out = x.clone()
    if noise > 0:
        out = (out + noise * torch.randn(out.shape, generator=gen)).clamp(0, 1)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    marked = torch.zeros(n, dtype=torch.bool)
    code_y = y if shortcut == "planted" else torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    if variant in ("corner_intensity", "random_corner"):
        if variant == "corner_intensity":
            corner = torch.zeros(n, dtype=torch.long)
        else:
            corner = torch.randint(0, 4, (n,), generator=gen)
        for i in range(n):
            top = 0 if int(corner[i]) in (0, 1) else h - mark
            left = 0 if int(corner[i]) in (0, 2) else w - mark
            mask[i, top:top + mark, left:left + mark] = True
        if shortcut != "none":
            marked[:] = True
            val = _code(code_y).view(n, 1, 1).expand(n, h, w)
            out[:, 0][mask] = val[mask]
    elif variant == "watermark":
        th, tw = _TAG.shape
        mask[:, h - th:, w - tw:] = True  # bottom-right corner
        if shortcut == "planted":
            eligible = (y == watermark_class).nonzero().view(-1)
            take = eligible[torch.rand(eligible.shape[0], generator=gen) < watermark_share]
        elif shortcut == "random":
            take = (torch.rand(n, generator=gen) < watermark_share / NUM_CLASSES).nonzero().view(-1)
        else:
            take = torch.zeros(0, dtype=torch.long)
        marked[take] = True
        for i in take.tolist():
            out[i, 0, h - th:, w - tw:] = _TAG
    else:  # background
        background = x[:, 0] < 0.05
        mask = background.clone()
        if shortcut != "none":
            marked[:] = True
            level = 0.35 * _code(code_y).view(n, 1, 1).expand(n, h, w)
            out[:, 0][background] = level[background]
    return ShortcutData(out, y.clone(), mask, marked)


def shortcut_digits(
    variant: str = "corner_intensity",
    train_shortcut: str = "planted",
    val_shortcut: str = "random",
    noise: float = 0.0,
    val_fraction: float = 0.3,
    seed: int = 0,
    **kwargs,
) -> Tuple[ShortcutData, ShortcutData]:
    """Train and validation splits of digits with a planted shortcut (see :func:`plant`)."""
    x, y = load_digits_tensors()
    tr, va = split_indices(x.shape[0], val_fraction, seed)
    train = plant(x[tr], y[tr], variant, train_shortcut, noise=noise, seed=seed, **kwargs)
    val = plant(x[va], y[va], variant, val_shortcut, noise=noise, seed=seed + 1, **kwargs)
    return train, val


def region_mask(variant: str, size: Tuple[int, int] = (8, 8), mark: int = _MARK) -> Optional[Tensor]:
    """The fixed region of a variant's mark ``(H, W)`` bool, or None where it varies per sample."""
    h, w = size
    mask = torch.zeros(h, w, dtype=torch.bool)
    if variant == "corner_intensity":
        mask[:mark, :mark] = True
    elif variant == "watermark":
        mask[h - _TAG.shape[0]:, w - _TAG.shape[1]:] = True
    else:
        return None
    return mask
