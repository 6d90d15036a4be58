"""Per-sample corner candidates: a mark whose corner changes from image to image, and a tag on a few images.

A class-mean hotspot (:mod:`.hotspots`) finds a mark that sits in the same place in every image. It misses a
mark that moves (a different corner per image: the class means spread it over four corners) and one that
only a tenth of the images carry (the mean dilutes it). Both are found here from the inputs alone, per sample,
so the choice of the region cannot favour places where the model happens to be sensitive; the intervention
check (:mod:`.interventions`, :mod:`.alarm`) then decides whether the model relies on it.

* :func:`atypical_corners`: each sample's corner window whose content departs most from what the probe set
  holds there. Per pixel, the departure is the robust z-score
  :math:`|x_{n,p} - \\operatorname{med}_m x_{m,p}| / \\operatorname{MAD}_p`, averaged over the window.
* :func:`find_stamps`: corner windows whose content recurs (to ``rel_tol`` of the typical distance between
  samples there) in at least ``min_copies`` other samples, is not the usual content there (the median) and is
  not uniform: a source tag, a logo, a text stamp, pasted pixel for pixel. Flat marks are left to
  :func:`atypical_corners` and :func:`~lightning_xai.shortcuts._hotspots.flat_background` (a flat corner of a
  background recurs in every image of one brightness).

Only the four corners are searched: windows along the whole border or anywhere else cover stroke ends,
and a model trained without any shortcut is genuinely more sensitive there than at change-matched controls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._utils import expected


FLAT_SHARE = 0.25


@dataclass
class StampResult:
    """``masks (N, H, W)``: each sample's stamp window (samples without one get the window most carriers use);
    ``carriers (N,)``: the samples carrying a stamp; ``copies (N,)``: how many other samples carry the same one."""

    masks: Tensor
    carriers: Tensor
    copies: Tensor


def corner_side(size: Tuple[int, int]) -> int:
    """Side of the corner windows: ``max(1, round(3 * min(H, W) / 8))`` (3 on 8 x 8 digits, 84 on 224 x 224)."""
    return max(1, round(3 * min(size) / 8))


def corner_windows(size: Tuple[int, int], side: Optional[int] = None) -> Tensor:
    """The four square corner windows ``(4, H, W)`` (top left, top right, bottom left, bottom right).

    Example:
        >>> corner_windows((8, 8), 2).sum((1, 2)).tolist()
        [4, 4, 4, 4]
    """
    h, w = size
    s = corner_side(size) if side is None else int(side)
    if not 0 < s <= min(h, w):
        raise ValueError(expected("side", f"an int in [1, {min(h, w)}]", side))
    out = torch.zeros(4, h, w, dtype=torch.bool)
    for k, (top, left) in enumerate([(0, 0), (0, w - s), (h - s, 0), (h - s, w - s)]):
        out[k, top:top + s, left:left + s] = True
    return out


def _window_contents(inputs: Tensor, windows: Tensor) -> Tensor:
    """Each sample's content of each window ``(N, B, C * A)`` (all windows have the same area)."""
    flat = inputs.detach().flatten(2).float()  # (N, C, HW)
    return torch.stack([flat[:, :, w.flatten()].flatten(1) for w in windows], 1)


def _check_inputs(inputs: Tensor) -> None:
    if inputs.ndim != 4 or not inputs.is_floating_point():
        raise ValueError(expected("inputs", "float images of shape (N, C, H, W)", inputs))


def atypical_corners(inputs: Tensor, side: Optional[int] = None) -> Tensor:
    """Per sample, the corner window whose content departs most from the probe set's there ``(N, H, W)``.

    The departure of a window is the mean over its pixels (and channels) of the robust z-score
    :math:`|x_{n,p} - \\operatorname{med}_m x_{m,p}| / \\max(\\operatorname{MAD}_p, 0.01\\,(\\max x - \\min x))`, so a
    bright mark on a dark corner scores high wherever it sits. Model-free: the region cannot have been chosen
    where the model is sensitive.

    Args:
        inputs: probe images ``(N, C, H, W)``.
        side: window side (default :func:`corner_side`).

    Example:
        >>> x = torch.rand(20, 1, 8, 8) * 0.1; x[:10, :, :3, :3] = 1.0; x[10:, :, -3:, -3:] = 1.0
        >>> m = atypical_corners(x)
        >>> bool(m[0, 0, 0]), bool(m[15, -1, -1])
        (True, True)
    """
    _check_inputs(inputs)
    windows = corner_windows(tuple(inputs.shape[-2:]), side).to(inputs.device)  # (4, H, W)
    cont = _window_contents(inputs, windows)  # (N, 4, C * A)
    med = cont.median(0).values
    floor = max(0.01 * float(inputs.detach().max() - inputs.detach().min()), 1e-12)  # 1 % of the value range
    mad = (cont - med).abs().median(0).values.clamp_min(floor)
    score = ((cont - med).abs() / mad).mean(2)  # (N, 4)
    return windows[score.argmax(1)].contiguous()


def find_stamps(inputs: Tensor, side: Optional[int] = None, min_copies: int = 3,
                rel_tol: float = 0.03) -> Optional[StampResult]:
    """Samples carrying a pasted pattern in a corner, or None when fewer than ``min_copies + 1`` do.

    In each corner window a sample is a *carrier* when at least ``min_copies`` other samples hold the same
    content there (Euclidean distance at most ``rel_tol`` times the mean distance between samples in that
    window), and that content is neither the window's median content (the usual background) nor nearly uniform:
    its spread about its own mean (Euclidean) must exceed :data:`FLAT_SHARE` (a quarter) of the mean distance
    between samples there, and the tolerance. A background of one brightness per image with a stroke end in the
    corner recurs in every image of that brightness and is not a pattern (on planted-background digits such
    windows, spread 0.09 against a mean distance of 0.9, were proposed and fired on a clean model); the 3x3 tag
    of the watermark digits has a spread of 1.5 against 1.3-1.5. A sample carrying several gets the window with
    the most copies.

    Args:
        inputs: probe images ``(N, C, H, W)``.
        side: window side (default :func:`corner_side`).
        min_copies: fewest other samples with the same content.
        rel_tol: tolerance, as a share of the mean distance between samples' contents of the window. A pasted tag
            repeats pixel for pixel; parts of the object repeat only roughly (see docs/shortcuts_history.md for
            how the default was chosen).

    Example:
        >>> x = torch.rand(40, 1, 8, 8); x[:6, 0, -3:, -3:] = torch.eye(3)
        >>> find_stamps(x).carriers[:8].tolist()
        [True, True, True, True, True, True, False, False]
    """
    _check_inputs(inputs)
    if isinstance(min_copies, bool) or not isinstance(min_copies, int) or min_copies < 1:
        raise ValueError(expected("min_copies", "a positive int", min_copies))
    if not 0 < rel_tol < 1:
        raise ValueError(expected("rel_tol", "a float in (0, 1)", rel_tol))
    n = inputs.shape[0]
    if n <= min_copies:
        return None
    windows = corner_windows(tuple(inputs.shape[-2:]), side).to(inputs.device)
    flat_x = inputs.detach().flatten(2).float()  # (N, C, HW)
    best = torch.full((n,), -1, dtype=torch.long, device=inputs.device)
    copies = torch.zeros(n, dtype=torch.long, device=inputs.device)
    for b in range(windows.shape[0]):  # one window at a time: bounded memory for large images
        c = flat_x[:, :, windows[b].flatten()].flatten(1)  # (N, C * A)
        dist = torch.cdist(c, c)  # (N, N)
        spread = float(dist.double().sum()) / (n * (n - 1))  # mean distance between samples' contents
        tol = rel_tol * spread
        count = (dist <= tol).sum(1) - 1
        usual = (c - c.median(0).values).norm(dim=1) <= tol
        flat = (c - c.mean(1, keepdim=True)).norm(dim=1) <= max(tol, FLAT_SHARE * spread)
        carrier = (count >= min_copies) & ~usual & ~flat & (count > copies)
        best[carrier] = b
        copies[carrier] = count[carrier]
    carriers = best >= 0
    if int(carriers.sum()) < min_copies + 1:
        return None
    common = int(best[carriers].mode().values)
    masks = windows[torch.where(carriers, best, torch.full_like(best, common))].contiguous()
    return StampResult(masks, carriers, copies)


def stamp_donor_masks(inputs: Tensor, stamps: StampResult, own: Union[StampResult, None, str] = "find") -> Tensor:
    """The stamp windows of other samples ``(M, H, W)`` (the reference samples that give the swapped-in content,
    see :func:`~lightning_xai.shortcuts.plan_interventions`).

    Args:
        inputs: those samples ``(M, C, H, W)``.
        stamps: the probe set's :func:`find_stamps` result.
        own: :func:`find_stamps` of ``inputs`` where the caller has it (``None``: they carry none), or ``"find"``
            (the default) to compute it here. Where they carry stamps of their own, their windows are used (so a
            training tag is pasted whole); otherwise every sample gets the window most probe carriers use.

    Example:
        >>> x = torch.rand(40, 1, 8, 8); x[:6, 0, -3:, -3:] = torch.eye(3)
        >>> stamp_donor_masks(torch.rand(5, 1, 8, 8), find_stamps(x))[:, -1, -1].tolist()
        [True, True, True, True, True]
    """
    _check_inputs(inputs)
    if isinstance(own, str):
        if own != "find":
            raise ValueError(expected("own", "a find_stamps result, None (no stamps of their own) or 'find'", own))
        own = find_stamps(inputs)
    elif own is not None and not isinstance(own, StampResult):
        raise TypeError(expected("own", "a find_stamps result, None (no stamps of their own) or 'find'",
                                 type(own).__name__))
    if own is not None and own.masks.shape[-2:] == stamps.masks.shape[-2:]:
        return own.masks
    windows, counts = torch.unique(stamps.masks[stamps.carriers].flatten(1), dim=0, return_counts=True)
    common = windows[counts.argmax()].view(stamps.masks.shape[-2:]).to(inputs.device)
    return common.unsqueeze(0).expand(inputs.shape[0], -1, -1).contiguous()
