"""How well classes separate in a feature space: silhouette and between/within variance ratio.

Pure torch. These turn "the classes pull apart at layer 3" into one number per layer and epoch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lightning_xai._utils import check_choice, expected

SEPARATION_METHODS = ("silhouette", "variance_ratio")


def _separation_validate_args(features: Tensor, labels: Tensor) -> None:
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise ValueError(expected("features", "a tensor of shape (N, D)", features))
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(expected("labels", f"a tensor of shape ({features.shape[0]},)", labels))


def silhouette_score(features: Tensor, labels: Tensor) -> Tensor:
    r"""Mean silhouette coefficient of the samples (Euclidean distance).

    For sample :math:`i` with :math:`a_i` the mean distance to the other members of its class and
    :math:`b_i` the smallest mean distance to the members of another class,
    :math:`s_i = (b_i - a_i) / \max(a_i, b_i)`; samples alone in their class count as 0 (as in
    scikit-learn). Rousseeuw, 1987, https://doi.org/10.1016/0377-0427(87)90125-7.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)`` class of each row; at least two classes.

    Returns:
        A scalar tensor in ``[-1, 1]``; NaN when there are fewer than two classes.

    Example:
        >>> x = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
        >>> round(float(silhouette_score(x, torch.tensor([0, 0, 1, 1]))), 3)
        0.98
    """
    _separation_validate_args(features, labels)
    x = features.detach().double()
    classes, inverse = torch.unique(labels, return_inverse=True)
    if classes.numel() < 2:
        return torch.tensor(float("nan"))
    dist = torch.cdist(x, x)  # (N, N)
    onehot = torch.nn.functional.one_hot(inverse, classes.numel()).double()  # (N, K)
    counts = onehot.sum(0)  # (K,)
    mean_to = dist @ onehot  # (N, K): sum of distances to each class
    own = counts[inverse]
    a = mean_to.gather(1, inverse.view(-1, 1)).squeeze(1) / (own - 1).clamp_min(1)
    other = mean_to / counts
    other.scatter_(1, inverse.view(-1, 1), float("inf"))
    b = other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-300)
    s = torch.where(own > 1, s, torch.zeros_like(s))
    return s.mean().float()


def variance_ratio(features: Tensor, labels: Tensor) -> Tensor:
    r"""Between-class over within-class dispersion (the Calinski-Harabasz index).

    :math:`\frac{\operatorname{tr}(B) / (K - 1)}{\operatorname{tr}(W) / (N - K)}` with :math:`B` the
    between-class and :math:`W` the within-class scatter. Unbounded; larger means better separated.
    Calinski & Harabasz, 1974, https://doi.org/10.1080/03610927408827101.

    Args:
        features: ``(N, D)``.
        labels: ``(N,)``; at least two classes and more samples than classes.

    Returns:
        A scalar tensor; NaN when it is undefined, ``inf`` when every class collapses to a point.
    """
    _separation_validate_args(features, labels)
    x = features.detach().double()
    classes, inverse = torch.unique(labels, return_inverse=True)
    n, k = x.shape[0], classes.numel()
    if k < 2 or n <= k:
        return torch.tensor(float("nan"))
    onehot = torch.nn.functional.one_hot(inverse, k).double()  # (N, K)
    counts = onehot.sum(0)
    centroids = (onehot.T @ x) / counts.unsqueeze(1)  # (K, D)
    mean = x.mean(0)
    between = (counts * (centroids - mean).pow(2).sum(1)).sum()
    within = (x - centroids[inverse]).pow(2).sum()
    if float(within) == 0:
        return torch.tensor(float("inf"))
    return (between / (k - 1) / (within / (n - k))).float()


def class_separation(features: Tensor, labels: Tensor, method: str = "silhouette") -> Tensor:
    """Class separation of ``features`` by ``method`` (``"silhouette"`` or ``"variance_ratio"``).

    Example:
        >>> x = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
        >>> float(class_separation(x, torch.tensor([0, 0, 1, 1]), "variance_ratio")) > 1000
        True
    """
    check_choice("method", method, SEPARATION_METHODS)
    return silhouette_score(features, labels) if method == "silhouette" else variance_ratio(features, labels)
