"""SpRAy: spectral clustering of attribution maps to count a class's prediction strategies.

Lapuschkin et al. 2019 (https://www.nature.com/articles/s41467-019-08987-4) clustered the relevance
maps of one class and found the "horse" images a model recognised by their source tag as a separate
cluster. Here, per class: maps are reduced to ``|a|`` summed over channels, downsampled (area
pooling) to at most ``size`` pixels a side, normalised to sum 1, joined in a symmetric k-nearest-
neighbour graph with a Gaussian kernel (bandwidth: the median neighbour distance), and the
normalised Laplacian :math:`L = I - D^{-1/2} W D^{-1/2}` is decomposed with ``torch.linalg.eigh``.
The number of clusters is the position of the largest gap among the smallest eigenvalues
(:math:`k = \\arg\\max_{k \\le k_{max}} \\lambda_{k+1} - \\lambda_k`); a gap below ``min_gap`` means
one cluster. Labels come from k-means (k-means++ seeding from a private generator) on the row-
normalised first ``k`` eigenvectors (Ng, Jordan & Weiss 2001).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import check_positive_int, expected


@dataclass
class SprayResult:
    """Clusters of one set of maps: ``labels (N,)``, ``n_clusters``, the smallest ``eigenvalues`` and
    ``mean_maps (k, h, w)`` (each cluster's mean normalised map at the downsampled size)."""

    labels: Tensor
    n_clusters: int
    eigenvalues: Tensor
    mean_maps: Tensor


def downsample_maps(maps: Tensor, size: int = 16) -> Tensor:
    """``|a|`` summed over channels, area-pooled so the long side is at most ``size``, each map summing to 1 ``(N, h, w)``."""
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


def _kmeans(points: Tensor, k: int, generator: Optional[torch.Generator], iters: int = 50) -> Tensor:
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [points[first]]
    for _ in range(1, k):  # k-means++ seeding
        d = torch.cdist(points, torch.stack(centres)).min(1).values ** 2
        probs = d / d.sum() if float(d.sum()) > 0 else torch.full_like(d, 1.0 / n)
        centres.append(points[int(torch.multinomial(probs.cpu(), 1, generator=generator))])
    c = torch.stack(centres)
    labels = torch.zeros(n, dtype=torch.long, device=points.device)
    for _ in range(iters):
        labels_new = torch.cdist(points, c).argmin(1)
        for j in range(k):
            sel = labels_new == j
            if bool(sel.any()):
                c[j] = points[sel].mean(0)
        if torch.equal(labels_new, labels):
            break
        labels = labels_new
    return labels


def spray(maps: Tensor, max_clusters: int = 4, neighbours: int = 8, size: int = 16, min_gap: float = 0.1,
          generator: Optional[torch.Generator] = None) -> SprayResult:
    """Spectral clustering of attribution maps with the eigengap choosing the number of clusters.

    Args:
        maps: ``(N, C, H, W)`` or ``(N, H, W)`` attribution maps (of one class, usually).
        max_clusters: largest number of clusters considered.
        neighbours: ``k`` of the k-nearest-neighbour graph (capped at ``N - 1``).
        size: long side of the downsampled maps.
        min_gap: smallest eigengap that counts as structure; below it, one cluster.
        generator: private randomness for k-means seeding.

    Returns:
        :class:`SprayResult`.

    Example:
        >>> a = torch.zeros(20, 4, 4); a[:10, 0, 0] = 1; a[10:, 3, 3] = 1
        >>> spray(a + 0.01 * torch.rand(20, 4, 4, generator=torch.Generator().manual_seed(0))).n_clusters
        2
    """
    check_positive_int("max_clusters", max_clusters)
    check_positive_int("neighbours", neighbours)
    small = downsample_maps(maps, size)  # (N, h, w)
    n = small.shape[0]
    if n < 3:
        return SprayResult(torch.zeros(n, dtype=torch.long), 1, torch.zeros(0), small.mean(0, keepdim=True))
    pts = small.flatten(1).double()
    dist = torch.cdist(pts, pts)  # (N, N)
    kn = min(neighbours, n - 1)
    knn = dist.topk(kn + 1, largest=False).indices[:, 1:]  # (N, kn), self excluded
    adj = torch.zeros(n, n, dtype=torch.bool)
    adj.scatter_(1, knn, True)
    adj = adj | adj.T
    sigma = dist.gather(1, knn).median().clamp_min(1e-12)
    weights = torch.exp(-(dist / sigma) ** 2) * adj
    deg = weights.sum(1).clamp_min(1e-12)
    inv = deg.rsqrt()
    lap = torch.eye(n, dtype=torch.float64) - inv.view(-1, 1) * weights * inv.view(1, -1)
    evals, evecs = torch.linalg.eigh(lap)  # ascending
    kmax = min(max_clusters, n - 1)
    gaps = evals[1:kmax + 1] - evals[:kmax]
    k = int(gaps.argmax()) + 1 if gaps.numel() and float(gaps.max()) >= min_gap else 1
    if k == 1:
        labels = torch.zeros(n, dtype=torch.long)
    else:
        emb = evecs[:, :k]
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        labels = _kmeans(emb.float(), k, generator)
    k = int(labels.max()) + 1
    means = torch.stack([small[labels == j].mean(0) if bool((labels == j).any()) else torch.zeros_like(small[0])
                         for j in range(k)])
    return SprayResult(labels, k, evals[:kmax + 1].float(), means)


def spray_by_class(maps: Tensor, labels: Tensor, **kwargs) -> Dict[int, SprayResult]:
    """:func:`spray` on the maps of each class in ``labels (N,)`` (classes with fewer than 3 samples get one cluster)."""
    if labels.ndim != 1 or labels.shape[0] != maps.shape[0]:
        raise ValueError(expected("labels", f"a tensor of shape ({maps.shape[0]},)", labels))
    out: Dict[int, SprayResult] = {}
    for c in sorted(set(labels.tolist())):
        out[int(c)] = spray(maps[labels == c], **kwargs)
    return out


def class_mean_maps(maps: Tensor, labels: Tensor, size: Optional[int] = None) -> Dict[int, Tensor]:
    """Per class, the mean of the sum-normalised ``|a|`` maps ``(h, w)`` (downsampled when ``size`` is given)."""
    small = downsample_maps(maps, size if size is not None else max(maps.shape[-2:]))
    classes: List[int] = sorted(set(labels.tolist()))
    return {int(c): small[labels == c].mean(0) for c in classes}
