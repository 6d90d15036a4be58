"""Principal component analysis in torch with a deterministic sign convention.

Pure torch. The lecture's "PCA view" of a layer: centre the features, take the top right singular
vectors, project. Computed in float64 so results match scikit-learn's ``PCA`` to ~1e-10.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_xai._utils import check_positive_int, expected


class PCAResult(NamedTuple):
    """What :func:`pca` returns (every tensor float32, on the input's device).

    Attributes:
        projected: scores ``(N, k)``, the centred features in the components' basis.
        components: principal axes ``(k, D)``, rows of unit length, sign-fixed.
        explained_variance: variance along each axis ``(k,)`` (denominator ``N - 1``, like scikit-learn).
        explained_variance_ratio: share of the total variance along each axis ``(k,)``.
        mean: the feature means ``(D,)`` that were subtracted.
    """

    projected: Tensor
    components: Tensor
    explained_variance: Tensor
    explained_variance_ratio: Tensor
    mean: Tensor


def _pca_validate_args(features: Tensor, n_components: int) -> None:
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise ValueError(expected("features", "a tensor of shape (N, D)", features))
    if features.shape[0] < 2:
        raise ValueError(expected("features", "at least 2 rows", features))
    finite = torch.isfinite(features.detach()).all(1)  # (N,)
    if not bool(finite.all()):
        raise ValueError(f"Expected `features` to be finite, but got {int((~finite).sum())} rows holding NaN/inf.")
    check_positive_int("n_components", n_components)


def _pca_compute(features: Tensor, n_components: int) -> PCAResult:
    x = features.detach().double()
    mean = x.mean(0)
    centred = x - mean  # (N, D)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # s: (min(N, D),), vh: (min(N, D), D)
    k = min(n_components, vh.shape[0])
    components = vh[:k]
    # sign convention: the entry of largest |value| in each component is positive
    pivot = components.abs().argmax(1, keepdim=True)
    signs = torch.sign(components.gather(1, pivot)).clamp_min(0) * 2 - 1  # +1 or -1, never 0
    components = components * signs
    variance = s.pow(2) / (x.shape[0] - 1)
    total = variance.sum()
    ratio = variance[:k] / total if float(total) > 0 else torch.zeros_like(variance[:k])
    projected = centred @ components.T  # (N, k)
    if k < n_components:  # fewer samples or features than components asked for: pad with zeros
        pad = n_components - k
        projected = torch.cat([projected, projected.new_zeros(projected.shape[0], pad)], 1)
        components = torch.cat([components, components.new_zeros(pad, components.shape[1])])
        ratio = torch.cat([ratio, ratio.new_zeros(pad)])
        explained = torch.cat([variance[:k], variance.new_zeros(pad)])
    else:
        explained = variance[:k]
    return PCAResult(projected.float(), components.float(), explained.float(), ratio.float(), mean.float())


def pca(features: Tensor, n_components: int = 2) -> PCAResult:
    r"""Project features onto their top principal components.

    With centred features :math:`\tilde X = X - \bar x` and the SVD :math:`\tilde X = U S V^\top`,
    the components are the first ``k`` rows of :math:`V^\top`, the scores :math:`\tilde X V_k`, and
    the explained variance :math:`S_i^2 / (N - 1)`. Each component's sign is fixed so that its entry of
    largest absolute value is positive, so the same features always give the same picture.
    Pearson, 1901, https://doi.org/10.1080/14786440109462720.

    Args:
        features: ``(N, D)`` with ``N >= 2``, finite (leave rows with NaN/inf out first).
        n_components: ``k``; when ``min(N, D) < k`` the missing components are zero.

    Returns:
        A :class:`PCAResult`.

    Raises:
        ValueError: if ``features`` is not ``(N, D)`` with two or more rows, holds NaN/inf, or ``n_components`` is
            not positive.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [-2.0, 0.0], [-4.0, 0.0]])
        >>> res = pca(x, n_components=1)
        >>> res.components[0].tolist(), res.projected[:, 0].tolist()
        ([1.0, 0.0], [2.0, 0.0, -2.0])
    """
    _pca_validate_args(features, n_components)
    return _pca_compute(features, n_components)
