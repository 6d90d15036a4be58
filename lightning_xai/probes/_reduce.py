"""Feature reducers: turn a layer's activations ``(N, ...)`` into a bounded ``(N, k)`` feature matrix.

A probe on a flattened 64x64 conv map would need ``N * C * 4096`` floats and, with more dimensions
than samples, memorises any labelling (Hewitt & Liang 2019). Reducers keep the feature size fixed
whatever the map size: global average pooling, average+max pooling, ``s x s`` average pooling, a
seeded Johnson-Lindenstrauss random projection, and a mean over tokens for sequences.

Pure torch; the projection matrix comes from a private ``torch.Generator`` so the global RNG is
never touched.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_xai._utils import check_positive_int, expected

ReduceSpec = Union[None, str, Tuple[Any, ...], "Reducer"]

KINDS = ("auto", "identity", "flatten", "gap", "gap+max", "pool", "rproj", "tokens_mean")
DEFAULT_MAX_DIM = 1024
DEFAULT_RPROJ_DIM = 512


class Reducer:
    r"""A callable mapping activations ``(N, ...)`` to float features ``(N, k)``.

    Kinds:
        - ``"gap"``: mean over all axes after the channel axis, ``(N, C, *S) -> (N, C)``.
        - ``"gap+max"``: mean and max over space, ``(N, 2C)``.
        - ``"pool"`` (``size=s``, spelled ``"pool2"`` or ``("pool", 2)``): adaptive ``s x s`` average
          pooling then flattening, ``(N, C * s * s)``.
        - ``"rproj"`` (``k``, ``seed``): flatten, then multiply by a fixed Gaussian matrix
          :math:`R \in \mathbb{R}^{D \times k}`, :math:`R_{ij} \sim \mathcal{N}(0, 1/k)`, which keeps
          distances within :math:`1 \pm \epsilon` for :math:`k = O(\log N / \epsilon^2)`
          (Johnson-Lindenstrauss). The matrix itself holds ``D * k`` floats (128 MiB for a 32x64x64 map
          and ``k=256``), so for large conv maps prefer ``"gap"``/``"pool"``, or pool before projecting.
        - ``"tokens_mean"``: mean over tokens, ``(N, T, D) -> (N, D)``.
        - ``"flatten"`` / ``"identity"``: all values (only for small layers: the probe can memorise).
        - ``"auto"``: 4-D and 5-D maps -> ``gap``; 3-D sequences -> ``tokens_mean``; 2-D -> ``identity``
          unless wider than ``max_dim``, then ``rproj`` to ``k`` dims; anything else is flattened and
          projected when wider than ``max_dim``.

    Args:
        kind: one of ``"auto"``, ``"identity"``, ``"flatten"``, ``"gap"``, ``"gap+max"``, ``"pool"``,
            ``"rproj"``, ``"tokens_mean"``.
        size: output side of ``"pool"``.
        k: projection dimension of ``"rproj"`` (and of ``"auto"`` for wide layers).
        seed: seed of the projection matrix.
        max_dim: widest feature ``"auto"`` keeps without projecting.

    Example:
        >>> Reducer("gap")(torch.ones(4, 8, 16, 16)).shape
        torch.Size([4, 8])
        >>> Reducer("rproj", k=32, seed=0)(torch.ones(4, 8, 16, 16)).shape
        torch.Size([4, 32])
    """

    def __init__(self, kind: str = "auto", size: int = 2, k: int = DEFAULT_RPROJ_DIM, seed: int = 0,
                 max_dim: int = DEFAULT_MAX_DIM) -> None:
        if kind not in KINDS:
            raise ValueError(expected("reduce", "one of " + ", ".join(repr(c) for c in KINDS) + ", 'pool<s>', "
                                      "('pool', s), ('rproj', k[, seed]) or a Reducer", kind))
        check_positive_int("size", size)
        check_positive_int("k", k)
        check_positive_int("max_dim", max_dim)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(expected("seed", "an int", seed))
        self.kind, self.size, self.k, self.seed, self.max_dim = kind, size, k, seed, max_dim
        self._projections: Dict[Tuple[int, str], Tensor] = {}

    def __repr__(self) -> str:
        extra = {"pool": f", size={self.size}", "rproj": f", k={self.k}, seed={self.seed}"}.get(self.kind, "")
        return f"Reducer({self.kind!r}{extra})"

    def resolved_kind(self, shape: Tuple[int, ...]) -> str:
        """The concrete kind ``"auto"`` picks for activations of ``shape`` (batch axis included)."""
        if self.kind != "auto":
            return self.kind
        if len(shape) in (4, 5):
            return "gap"
        if len(shape) == 3:
            return "tokens_mean"
        width = 1
        for s in shape[1:]:
            width *= s
        return "flatten" if width <= self.max_dim else "rproj"

    def projection(self, dim: int, device: torch.device) -> Tensor:
        """The fixed ``(dim, k)`` projection matrix, drawn once per input width from a private generator."""
        key = (dim, str(device))
        if key not in self._projections:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            mat = torch.randn(dim, self.k, generator=gen, dtype=torch.float32) / self.k ** 0.5
            self._projections[key] = mat.to(device)
        return self._projections[key]

    def __call__(self, act: Tensor) -> Tensor:
        if not isinstance(act, Tensor) or act.ndim < 1:
            raise TypeError(expected("activation", "a tensor with a batch axis", type(act).__name__))
        act = act.detach()
        if not act.is_floating_point():
            act = act.float()
        kind = self.resolved_kind(tuple(act.shape))
        n = act.shape[0]
        if kind in ("identity", "flatten"):
            return act.reshape(n, -1)
        if kind == "gap":
            return act.reshape(n, act.shape[1], -1).mean(2) if act.ndim > 2 else act.reshape(n, -1)
        if kind == "gap+max":
            flat = act.reshape(n, act.shape[1], -1) if act.ndim > 2 else act.reshape(n, -1, 1)
            return torch.cat([flat.mean(2), flat.amax(2)], dim=1)
        if kind == "pool":
            if act.ndim == 4:
                return F.adaptive_avg_pool2d(act, self.size).reshape(n, -1)  # (N, C * s * s)
            if act.ndim == 3:
                return F.adaptive_avg_pool1d(act.transpose(1, 2), self.size).reshape(n, -1)  # (N, D * s)
            if act.ndim == 5:
                return F.adaptive_avg_pool3d(act, self.size).reshape(n, -1)
            return act.reshape(n, -1)
        if kind == "tokens_mean":
            return act.mean(1) if act.ndim == 3 else act.reshape(n, -1)
        # rproj
        flat = act.reshape(n, -1)  # (N, D)
        mat = self.projection(flat.shape[1], flat.device)
        return flat.to(mat.dtype) @ mat  # (N, k)


def make_reducer(spec: ReduceSpec = "auto", seed: int = 0, max_dim: int = DEFAULT_MAX_DIM) -> Reducer:
    """Build a :class:`Reducer` from a short spec.

    Args:
        spec: ``None``/``"auto"``, a kind name, ``"pool<s>"`` (``"pool2"``), ``("pool", s)``,
            ``"rproj"``, ``("rproj", k)`` or ``("rproj", k, seed)``, or a :class:`Reducer`.
        seed: default projection seed.
        max_dim: widest feature the automatic choice keeps without projecting.

    Raises:
        ValueError, TypeError: for an unknown spec; the message lists the valid ones.
    """
    if isinstance(spec, Reducer):
        return spec
    if spec is None:
        return Reducer("auto", seed=seed, max_dim=max_dim)
    if isinstance(spec, str):
        if spec.startswith("pool") and spec[4:].isdigit():
            return Reducer("pool", size=int(spec[4:]), seed=seed, max_dim=max_dim)
        return Reducer(spec, seed=seed, max_dim=max_dim)
    if isinstance(spec, (tuple, list)) and spec and isinstance(spec[0], str):
        kind, args = spec[0], list(spec[1:])
        if kind == "pool" and len(args) == 1:
            return Reducer("pool", size=args[0], seed=seed, max_dim=max_dim)
        if kind == "rproj" and len(args) in (1, 2):
            return Reducer("rproj", k=args[0], seed=args[1] if len(args) == 2 else seed, max_dim=max_dim)
    error = ValueError if isinstance(spec, (tuple, list)) else TypeError  # a malformed tuple, or not a spec at all
    raise error(expected("reduce", "'auto', 'identity', 'flatten', 'gap', 'gap+max', 'pool<s>', ('pool', s), "
                         "'rproj', ('rproj', k[, seed]), 'tokens_mean' or a Reducer", spec))


def input_reducer(shape: Tuple[int, ...], max_dim: int = DEFAULT_MAX_DIM, seed: int = 0) -> Reducer:
    """The reducer for the raw-input baseline: all pixels when they fit in ``max_dim``, else pooled or projected.

    Images ``(N, C, H, W)`` wider than ``max_dim`` are average-pooled to the largest ``s x s`` grid
    with ``C * s * s <= max_dim``; other wide inputs are randomly projected.
    """
    width = 1
    for s in shape[1:]:
        width *= s
    if width <= max_dim:
        return Reducer("flatten", max_dim=max_dim, seed=seed)
    if len(shape) == 4:
        side = int((max_dim // max(shape[1], 1)) ** 0.5)
        if side >= 1:
            return Reducer("pool", size=min(side, shape[2], shape[3]), max_dim=max_dim, seed=seed)
    return Reducer("rproj", k=min(DEFAULT_RPROJ_DIM, max_dim), seed=seed, max_dim=max_dim)
