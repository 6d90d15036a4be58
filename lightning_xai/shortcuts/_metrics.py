"""How much of an attribution map falls inside a region: share, share over area, relevance rank, pointing game.

All functions take maps ``(N, C, H, W)`` or ``(N, H, W)`` (channels are reduced with ``sum |a|``) and
boolean masks ``(N, H, W)``, and return one value per sample ``(N,)``; a sample with an empty mask or
an all-zero map gets NaN, so callers average with ``nanmean``. These are the quantities of Quantus'
relevance mass / rank accuracy and the pointing game (Zhang et al. 2018,
https://arxiv.org/abs/1608.00507), on absolute relevance.

They find candidates and describe a model; they do not decide an alarm (see :mod:`.alarm`): a bright
patch inflates Input x Gradient and IG mass on a model that ignores it, and a model can rely on a
region that plain saliency puts less than its area share on.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from lightning_xai._utils import expected


def _validate(maps: Tensor, masks: Tensor) -> Tensor:
    if maps.ndim == 4:
        maps = maps.detach().float().abs().sum(1)
    elif maps.ndim == 3:
        maps = maps.detach().float().abs()
    else:
        raise ValueError(expected("maps", "a tensor of shape (N, C, H, W) or (N, H, W)", maps))
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(expected("masks", f"a boolean tensor of shape {tuple(maps.shape)}", masks))
    return torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)


def _undefined(maps: Tensor, masks: Tensor) -> Tensor:
    return (masks.flatten(1).sum(1) == 0) | (maps.flatten(1).sum(1) <= 0)


def attribution_share(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Share of total absolute attribution inside the region.

    .. math:: s_n = \sum_{p \in R_n} |a_{n,p}| \,/\, \sum_p |a_{n,p}|

    Example:
        >>> maps = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
        >>> attribution_share(maps, torch.tensor([[[True, False], [False, False]]]))
        tensor([0.2500])
    """
    a = _validate(maps, masks)
    share = (a * masks).flatten(1).sum(1) / a.flatten(1).sum(1).clamp_min(1e-30)
    return share.masked_fill(_undefined(a, masks), float("nan"))


def share_ratio(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Attribution share divided by the region's share of the image: 1 means "no more than its area".

    .. math:: r_n = s_n \,/\, (|R_n| / HW)
    """
    a = _validate(maps, masks)
    area = masks.flatten(1).float().mean(1)
    return attribution_share(a, masks) / area.clamp_min(1e-30)


def relevance_rank(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Relevance rank accuracy: share of the region among the top-``k`` attributed pixels, ``k = |R_n|``.

    .. math:: \mathrm{rank}_n = |\mathrm{top}_{|R_n|}(|a_n|) \cap R_n| \,/\, |R_n|

    Ties are broken by pixel order (``torch.topk``). A uniform map scores about the area share.
    """
    a = _validate(maps, masks)
    flat, m = a.flatten(1), masks.flatten(1)
    sizes = m.sum(1)
    out = torch.empty(a.shape[0], device=a.device)
    order = flat.argsort(dim=1, descending=True, stable=True)  # (N, HW)
    for i in range(a.shape[0]):
        k = int(sizes[i])
        out[i] = m[i, order[i, :k]].float().sum() / max(k, 1)
    return out.masked_fill(_undefined(a, masks), float("nan"))


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """1.0 where the attribution peak (first maximum of ``|a|``) lies inside the region, else 0.0."""
    a = _validate(maps, masks)
    peak = a.flatten(1).argmax(1)
    hit = masks.flatten(1).gather(1, peak.view(-1, 1)).squeeze(1).float()
    return hit.masked_fill(_undefined(a, masks), float("nan"))


def region_metrics(maps: Tensor, masks: Tensor) -> Dict[str, Tensor]:
    """All four per-sample figures: ``share``, ``share_ratio``, ``rank``, ``pointing`` (each ``(N,)``)."""
    a = _validate(maps, masks)
    return {"share": attribution_share(a, masks), "share_ratio": share_ratio(a, masks),
            "rank": relevance_rank(a, masks), "pointing": pointing_game(a, masks)}
