"""Cosine nearest neighbours between feature sets: evidence rows and the support of a sample.

Pure torch. Features are compared by cosine similarity, chunked over the queries so that a bank of
many thousand training features never needs an ``(M, N)`` matrix at once.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from lightning_xai._utils import check_positive_int, chunks, expected


def _check_features(name: str, features: Tensor) -> None:
    if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
        raise ValueError(expected(name, "a float tensor of shape (N, D)", features if isinstance(features, Tensor)
                                  else type(features).__name__))


def _cosine_topk_validate_args(queries: Tensor, keys: Tensor, k: int, chunk_size: Optional[int]) -> None:
    _check_features("queries", queries)
    _check_features("keys", keys)
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(expected("keys", f"features of dimension {queries.shape[1]} like the queries", keys))
    check_positive_int("k", k)
    if k > keys.shape[0]:
        raise ValueError(expected("k", f"at most the number of keys ({keys.shape[0]})", k))
    check_positive_int("chunk_size", chunk_size, allow_none=True)


def unit_rows(features: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return features / features.norm(dim=1, keepdim=True).clamp_min(eps)


def _cosine_topk_compute(queries: Tensor, keys: Tensor, k: int, chunk_size: Optional[int]) -> Tuple[Tensor, Tensor]:
    q = unit_rows(queries.detach().float())
    kk = unit_rows(keys.detach().float().to(q.device))
    values, indices = [], []
    for start, stop in chunks(q.shape[0], chunk_size):
        sim = q[start:stop] @ kk.T  # (chunk, N)
        v, i = sim.topk(k, dim=1)
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


def cosine_topk(queries: Tensor, keys: Tensor, k: int, chunk_size: Optional[int] = 1024) -> Tuple[Tensor, Tensor]:
    r"""The ``k`` keys most similar to each query by cosine similarity.

    .. math:: \operatorname{sim}(q, k) = \frac{q^\top k}{\lVert q \rVert\, \lVert k \rVert}

    Args:
        queries: features ``(M, D)`` (e.g. probe samples).
        keys: features ``(N, D)`` (e.g. training samples), ``k <= N``.
        k: neighbours per query.
        chunk_size: queries per similarity block (memory ``chunk_size * N``); None for one block.

    Returns:
        ``(values, indices)``, both ``(M, k)``, most similar first; values are cosines in ``[-1, 1]``.

    Raises:
        ValueError: on shapes that do not match or ``k`` larger than the number of keys.

    Example:
        >>> keys = torch.eye(3)
        >>> values, indices = cosine_topk(torch.tensor([[2.0, 0.1, 0.0]]), keys, k=2)
        >>> indices.tolist()
        [[0, 1]]
    """
    _cosine_topk_validate_args(queries, keys, k, chunk_size)
    return _cosine_topk_compute(queries, keys, k, chunk_size)


def support(queries: Tensor, keys: Tensor, k: int = 10, chunk_size: Optional[int] = 1024) -> Tensor:
    r"""How well the training data covers each query: the mean cosine similarity of its ``k`` nearest keys.

    .. math:: s(q) = \frac{1}{k} \sum_{j \in \mathrm{top}_k(q)} \operatorname{sim}(q, k_j)

    A low value marks a *sparse* sample (few similar training samples: out of distribution, rare, or
    unlike anything the model learnt from), after TrustAI's sparse-data analysis.

    Args:
        queries: features ``(M, D)``; keys: features ``(N, D)``; k: neighbours averaged (``k <= N``).
        chunk_size: see :func:`cosine_topk`.

    Returns:
        ``(M,)`` support values in ``[-1, 1]``.

    Example:
        >>> keys = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
        >>> [round(v, 2) for v in support(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), keys, k=2).tolist()]
        [1.0, 0.06]
    """
    values, _ = cosine_topk(queries, keys, k, chunk_size)
    return values.mean(1)
