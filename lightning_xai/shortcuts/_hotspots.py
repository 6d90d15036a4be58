"""Input-independent hotspots: places every class attends to, proposed as candidate shortcut regions.

An object's evidence sits in different places for different classes (a 0's ring, a 1's stroke); a
shortcut sits in the same place whatever the class (the corner mark, the source tag). So per class
the absolute attribution maps are normalised to sum 1 and averaged, expressed relative to a uniform
map (1 = its area share), and the per-pixel *consistency* is the geometric mean over classes:

.. math:: S_p = \\exp\\big(\\tfrac{1}{|C|} \\textstyle\\sum_c \\log \\max(HW\\,\\bar a_{c,p}, \\epsilon)\\big)

With the inputs given, ``S`` is multiplied by ``1 - eta^2``, the share of the inputs' variance at
the pixel that the class does *not* explain, so the object, whose content distinguishes the classes,
is not proposed. A hotspot is the 4-connected component around the peak of ``S`` of pixels with
``S_p >= rel_threshold * max S``, kept when ``max S >= min_score``, its area is at most
``max_area`` of the image and its mean ``eta^2`` at most :data:`MAX_ETA2` (0.1: on noisy digits the
objects' pixels reach 0.1-0.5, a mark with a class-independent code stays near 0). It is only a *candidate*: the
intervention check
(:mod:`._test`) decides whether the model relies on it. Maps from Input x
Gradient or Occlusion concentrate on a bright mark where plain saliency may not.

:func:`flat_background` proposes the other kind of candidate: per sample, the pixels of one exact value
covering a large share of the image (the black PNG backgrounds of the Pokemon/Digimon classifier).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import expected


MAX_ETA2 = 0.1


def downsample_maps(maps: Tensor, size: int = 16) -> Tensor:
    """``|a|`` summed over channels, area-pooled so the long side is at most ``size``, each map summing to 1
    ``(N, h, w)``."""
    if maps.ndim == 4:
        a = maps.detach().float().abs().sum(1)
    elif maps.ndim == 3:
        a = maps.detach().float().abs()
    else:
        raise ValueError(expected("maps", "a tensor of shape (N, C, H, W) or (N, H, W)", maps))
    a = torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    h, w = a.shape[-2:]
    scale = max(h, w) / size
    if scale > 1:
        a = F.adaptive_avg_pool2d(a.unsqueeze(1), (max(1, round(h / scale)), max(1, round(w / scale)))).squeeze(1)
    return a / a.flatten(1).sum(1).clamp_min(1e-30).view(-1, 1, 1)


def class_mean_maps(maps: Tensor, labels: Tensor, size: Optional[int] = None) -> Dict[int, Tensor]:
    """Per class, the mean of the sum-normalised ``|a|`` maps ``(h, w)`` (downsampled when ``size`` is given)."""
    small = downsample_maps(maps, size if size is not None else max(maps.shape[-2:]))
    classes: List[int] = sorted(set(labels.tolist()))
    return {int(c): small[labels == c].mean(0) for c in classes}


@dataclass
class HotspotResult:
    """``mask (H, W)`` bool or None when nothing qualifies; ``score (h, w)`` the consistency map; ``peak`` its max."""

    mask: Optional[Tensor]
    score: Tensor
    peak: float


def consistency_map(maps: Tensor, labels: Tensor, size: int = 32, eps: float = 1e-2) -> Tensor:
    """The geometric mean over classes of class-mean attribution relative to uniform ``(h, w)`` (module docstring)."""
    if labels.ndim != 1 or labels.shape[0] != maps.shape[0]:
        raise ValueError(expected("labels", f"a tensor of shape ({maps.shape[0]},)", labels))
    small = downsample_maps(maps, size)  # (N, h, w), each sums to 1
    hw = small.shape[-1] * small.shape[-2]
    logs = [torch.log((small[labels == c].mean(0) * hw).clamp_min(eps)) for c in sorted(set(labels.tolist()))]
    return torch.stack(logs).mean(0).exp()


def class_eta2(inputs: Tensor, labels: Tensor, size: int = 32) -> Tensor:
    """Per pixel, the share of the inputs' variance explained by the class (eta squared) ``(h, w)``.

    High where the input content itself tells the classes apart (the object), near 0 where it does not.
    Channels are summed; images are area-pooled like the maps.
    """
    x = inputs.detach().float().sum(1)  # (N, H, W)
    h, w = x.shape[-2:]
    scale = max(h, w) / size
    if scale > 1:
        x = F.adaptive_avg_pool2d(x.unsqueeze(1), (max(1, round(h / scale)), max(1, round(w / scale)))).squeeze(1)
    total = x.var(0, unbiased=False)
    mean = x.mean(0)
    between = torch.zeros_like(mean)
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        between += sel.float().mean() * (x[sel].mean(0) - mean) ** 2
    return (between / total.clamp_min(1e-12)).clamp(0, 1)


def _component(seed_mask: Tensor, start: int) -> Tensor:
    """4-connected component of ``seed_mask (h, w)`` containing flat index ``start``."""
    comp = torch.zeros_like(seed_mask)
    comp.view(-1)[start] = True
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    while True:
        grown = (F.conv2d(comp.float()[None, None], kernel, padding=1)[0, 0] > 0) & seed_mask
        if torch.equal(grown, comp):
            return comp
        comp = grown


def find_hotspot(maps: Tensor, labels: Tensor, size: int = 32, rel_threshold: float = 0.5, min_score: float = 2.0,
                 max_area: float = 0.15, min_classes: int = 2, inputs: Optional[Tensor] = None,
                 max_eta2: float = MAX_ETA2) -> HotspotResult:
    """Propose one candidate region where attribution is high for every class.

    Args:
        maps: attribution maps ``(N, C, H, W)`` or ``(N, H, W)`` of the probe samples.
        labels: class (label or prediction) of each sample ``(N,)``.
        size: long side of the maps while scoring (the mask is upsampled back to ``(H, W)``).
        rel_threshold: pixels scoring at least this share of the peak join the hotspot.
        min_score: smallest peak consistency (times the uniform level) that counts.
        max_area: largest hotspot, as a share of the image.
        min_classes: fewest distinct classes needed (one class cannot show input-independence).
        inputs: the probe images ``(N, C, H, W)``; when given, the consistency is multiplied by
            ``1 - eta^2`` (:func:`class_eta2`), so places whose input content tells the classes apart
            (the object) are not proposed, and a hotspot whose mean ``eta^2`` exceeds ``max_eta2`` is dropped.
        max_eta2: largest mean ``eta^2`` inside a hotspot (with ``inputs``); see :data:`MAX_ETA2`.

    Returns:
        :class:`HotspotResult`; ``mask`` is None when no pixel qualifies.

    Example:
        >>> maps = torch.rand(40, 8, 8, generator=torch.Generator().manual_seed(0)); maps[:, :2, :2] += 5
        >>> find_hotspot(maps, torch.arange(40) % 4).mask[:3, :3].int()
        tensor([[1, 1, 0],
                [1, 1, 0],
                [0, 0, 0]], dtype=torch.int32)
    """
    if not 0 < rel_threshold <= 1:
        raise ValueError(expected("rel_threshold", "a float in (0, 1]", rel_threshold))
    if not 0 < max_area <= 1:
        raise ValueError(expected("max_area", "a float in (0, 1]", max_area))
    h, w = maps.shape[-2:]
    score = consistency_map(maps, labels, size)
    eta2 = None
    if inputs is not None:
        eta2 = class_eta2(inputs, labels, size)
        score = score * (1 - eta2)
    peak = float(score.max())
    if len(set(labels.tolist())) < min_classes or peak < min_score:
        return HotspotResult(None, score, peak)
    comp = _component(score >= rel_threshold * peak, int(score.argmax()))
    if float(comp.float().mean()) > max_area:
        return HotspotResult(None, score, peak)
    if eta2 is not None and float(eta2[comp].mean()) > max_eta2:  # the content there tells the classes apart
        return HotspotResult(None, score, peak)
    if comp.shape != (h, w):
        comp = F.interpolate(comp.float()[None, None], size=(h, w), mode="nearest")[0, 0] > 0
    return HotspotResult(comp, score, peak)


def flat_background(inputs: Tensor, min_share: float = 0.25, min_samples: float = 0.5,
                    atol: float = 1e-6) -> Optional[Tensor]:
    """Per-sample masks of a flat background ``(N, H, W)``: the pixels holding the sample's most frequent value.

    The black PNG background of the Pokemon/Digimon classifier is the case in point: a large area of one
    exact value that differs between the classes' sources. A sample whose most frequent value (all channels,
    to ``atol``) covers less than ``min_share`` of its pixels gets an empty mask; None when fewer than
    ``min_samples`` of the samples have a flat background. Like a hotspot, it is only a candidate region.

    Example:
        >>> x = torch.rand(4, 1, 8, 8); x[:, :, :4] = 0.2
        >>> flat_background(x).sum((1, 2)).tolist()
        [32, 32, 32, 32]
    """
    if inputs.ndim != 4:
        raise ValueError(expected("inputs", "images of shape (N, C, H, W)", inputs))
    n, c, h, w = inputs.shape
    q = torch.round(inputs.detach().double() / atol).to(torch.int64)  # (N, C, H, W)
    key = q[:, 0].reshape(n, h * w)
    for ch in range(1, c):  # one integer per pixel; int64 arithmetic wraps, a collision is vanishingly unlikely
        key = key * 1000003 + q[:, ch].reshape(n, h * w)
    mode = key.mode(dim=1).values  # (N,) the most frequent value of each sample
    masks = key == mode.unsqueeze(1)  # (N, HW)
    masks &= masks.sum(1, keepdim=True) >= min_share * h * w
    if float(masks.any(1).float().mean()) < min_samples:
        return None
    return masks.view(n, h, w)


def attribution_peaks(maps: Tensor, side: Optional[int] = None) -> Tensor:
    """Per sample, the square window of side ``side`` (default: the preset corners' side, ``round(min(H, W) / 4)``)
    holding the most absolute attribution ``(N, H, W)``.

    A mark that moves from image to image (on the object or off it) has no fixed place, so no preset or hotspot
    covers it; where the model reads it, its own attribution map peaks on it. Chosen where the model is most sensitive,
    the window holds each sample's most telling content by construction, so its test is biased towards a pull
    (:data:`~lightning_xai.shortcuts._api.SHOWN_ONLY`): it is ranked and shown, never alarmed on.

    Example:
        >>> maps = torch.zeros(2, 8, 8); maps[0, 5, 6] = 1.0; maps[1, 0, 0] = -2.0
        >>> peaks = attribution_peaks(maps)
        >>> bool(peaks[0, 5, 6]), bool(peaks[1, 0, 0]), int(peaks[0].sum())
        (True, True, 4)
    """
    if maps.ndim == 4:
        maps = maps.abs().sum(1)
    if maps.ndim != 3:
        raise ValueError(expected("maps", "attribution maps of shape (N, H, W) or (N, C, H, W)", maps))
    n, h, w = maps.shape
    side = max(1, min(round(min(h, w) / 4) if side is None else side, h, w))
    mass = F.avg_pool2d(maps.detach().float().abs().unsqueeze(1), side, stride=1).flatten(1)  # (N, windows)
    best = mass.argmax(1)
    top, left = best // (w - side + 1), best % (w - side + 1)
    rows = torch.arange(h, device=maps.device).view(1, h)
    cols = torch.arange(w, device=maps.device).view(1, w)
    in_rows = (rows >= top.view(-1, 1)) & (rows < top.view(-1, 1) + side)
    in_cols = (cols >= left.view(-1, 1)) & (cols < left.view(-1, 1) + side)
    return (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).cpu()
