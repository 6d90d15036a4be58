r"""Streaming closed-form ridge regression with an intercept, for linear probes.

Each batch adds to float64 sufficient statistics (``n``, ``sum x``, ``X^T X``, and per target
``sum y``, ``X^T Y``, ``sum y^2``); nothing per sample is kept, so memory is ``O(d^2)`` whatever the
number of samples, batches can be merged in any order, and a distributed run sums the statistics
(:meth:`StreamingRidge.pack`/:meth:`StreamingRidge.unpack`) to get exactly the single-process probe.

Solving centres the statistics (that is the intercept) and eigendecomposes the centred covariance
:math:`C = V \operatorname{diag}(s) V^\top` once; every ridge strength :math:`\alpha` then costs a
rescaling:

.. math:: \hat\beta_\alpha = V \operatorname{diag}\big(1/(s + \alpha)\big) V^\top X_c^\top Y_c,
   \qquad b = \bar y - \bar x^\top \hat\beta_\alpha.

The strength is chosen by generalised cross-validation (Golub, Heath & Wahba 1979,
https://doi.org/10.1080/00401706.1979.10489751), computed from the statistics alone,

.. math:: \mathrm{GCV}(\alpha) = \frac{n \, \mathrm{RSS}(\alpha)}{(n - \mathrm{df}(\alpha))^2},\quad
   \mathrm{df}(\alpha) = 1 + \sum_i \frac{s_i}{s_i + \alpha},\quad
   \mathrm{RSS}(\alpha) = \sum_t \Big(\|y_{c,t}\|^2 - \sum_i z_{it}^2 \frac{s_i + 2\alpha}{(s_i + \alpha)^2}\Big),

with :math:`Z = V^\top X_c^\top Y_c`, or by k-fold cross-validation over per-fold statistics.

Pure torch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._utils import expected, single_thread

DEFAULT_RELATIVE_ALPHAS: Tuple[float, ...] = tuple(10.0 ** e for e in torch.linspace(-5, 3, 17).tolist())
DEFAULT_TARGET = "y"
# Small CPU eigendecompositions gain nothing from threads, and on a busy machine LAPACK's threads can
# spin-wait for cores held by other processes (measured: d=128 takes 2 ms on one thread, 1.4 s on two).
SINGLE_THREAD_EIGH_MAX = 1024


@dataclass
class RidgeSolution:
    """A solved probe: ``predict(X) = X @ coef + intercept``.

    Attributes:
        coef: ``(d, t)`` float64 weights.
        intercept: ``(t,)`` float64.
        alpha: the ridge strength used.
        alphas: the candidate strengths (empty when ``alpha`` was given).
        scores: the selection criterion per candidate (GCV or mean k-fold MSE; lower is better).
    """

    coef: Tensor
    intercept: Tensor
    alpha: float
    alphas: Tensor
    scores: Tensor

    def predict(self, x: Tensor) -> Tensor:
        """Predictions ``(N, t)`` in float64 for features ``(N, d)``."""
        return x.to(self.coef.dtype) @ self.coef + self.intercept

    def classify(self, x: Tensor) -> Tensor:
        """Argmax class ``(N,)`` for one-hot targets."""
        return self.predict(x).argmax(dim=1)


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``(N,)`` integer labels to ``(N, num_classes)`` float64 one-hot rows (labels < 0 give zero rows)."""
    labels = labels.reshape(-1).long()
    out = torch.zeros(labels.shape[0], num_classes, dtype=torch.float64, device=labels.device)
    valid = (labels >= 0) & (labels < num_classes)
    out[valid.nonzero().squeeze(1), labels[valid]] = 1.0
    return out


class _Stats:
    """Float64 sufficient statistics of one group of rows (one fold, or all rows)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        kw = dict(dtype=torch.float64, device=device)
        self.n = torch.zeros((), **kw)
        self.sx = torch.zeros(dim, **kw)
        self.xtx = torch.zeros(dim, dim, **kw)
        self.targets: Dict[str, Dict[str, Tensor]] = {}

    def ensure(self, name: str, width: int) -> None:
        """Create target ``name`` or widen it with zero columns to ``width``."""
        kw = dict(dtype=torch.float64, device=self.xtx.device)
        dim = self.xtx.shape[0]
        if name not in self.targets:
            self.targets[name] = {"sy": torch.zeros(width, **kw), "xty": torch.zeros(dim, width, **kw),
                                  "yty": torch.zeros(width, **kw)}
            return
        t = self.targets[name]
        extra = width - t["sy"].shape[0]
        if extra > 0:
            t["sy"] = torch.cat([t["sy"], torch.zeros(extra, **kw)])
            t["yty"] = torch.cat([t["yty"], torch.zeros(extra, **kw)])
            t["xty"] = torch.cat([t["xty"], torch.zeros(dim, extra, **kw)], dim=1)

    def tensors(self) -> List[Tensor]:
        out = [self.n.view(1), self.sx, self.xtx.reshape(-1)]
        for name in sorted(self.targets):
            t = self.targets[name]
            out += [t["sy"], t["xty"].reshape(-1), t["yty"]]
        return out


class StreamingRidge:
    r"""Ridge regression with an intercept from streamed float64 sufficient statistics.

    Args:
        alphas: candidate ridge strengths. ``None`` (default) uses a relative grid
            :math:`10^{-5} \dots 10^{3}` times the mean eigenvalue of the centred covariance, so the
            choice does not depend on the feature scale; a sequence gives absolute strengths (as
            scikit-learn's ``Ridge(alpha=...)``).
        cv: ``"gcv"`` (default, generalised cross-validation from the statistics) or an int ``k >= 2``
            for k-fold cross-validation (each :meth:`update` then needs ``folds``).

    Example:
        >>> x = torch.randn(100, 5, dtype=torch.float64)
        >>> y = x @ torch.arange(5.0, dtype=torch.float64).view(5, 1) + 3
        >>> ridge = StreamingRidge(alphas=[1e-8])
        >>> ridge.update(x[:60], y[:60]); ridge.update(x[60:], y[60:])
        >>> sol = ridge.solve()
        >>> bool(torch.allclose(sol.intercept, torch.tensor([3.0], dtype=torch.float64)))
        True
    """

    def __init__(self, alphas: Optional[Sequence[float]] = None, cv: Union[str, int] = "gcv") -> None:
        if alphas is not None:
            given = alphas
            values = alphas.tolist() if isinstance(alphas, Tensor) and alphas.ndim == 1 else alphas
            values = list(values) if isinstance(values, Iterable) and not isinstance(values, (str, bytes)) else []
            if not values or not all(isinstance(a, numbers.Real) and not isinstance(a, bool) and 0 < a < math.inf
                                     for a in values):
                shown = given if isinstance(given, (list, tuple, str, Tensor)) else type(given).__name__
                raise ValueError(expected("alphas", "a non-empty sequence of positive floats or None", shown))
            alphas = [float(a) for a in values]
        if cv != "gcv" and (isinstance(cv, bool) or not isinstance(cv, int) or cv < 2):
            error = ValueError if isinstance(cv, (str, int)) and not isinstance(cv, bool) else TypeError
            raise error(expected("cv", "'gcv' or an int >= 2 (k-fold)", cv))
        self.alphas = alphas
        self.cv = cv
        self.dim: Optional[int] = None
        self._folds: List[_Stats] = []
        self._eig_cache: Optional[Tuple[int, Tensor, Tensor]] = None
        self._version = 0

    # ------------------------------------------------------------------ accumulation
    @property
    def num_folds(self) -> int:
        return 1 if self.cv == "gcv" else int(self.cv)

    @property
    def n(self) -> int:
        return int(sum(float(f.n) for f in self._folds)) if self._folds else 0

    def _init(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        self._folds = [_Stats(dim, device) for _ in range(self.num_folds)]

    def ensure_target(self, name: str, width: int) -> None:
        """Create (or widen with zero columns) target ``name``; needs the feature width known (``init``)."""
        for f in self._folds:
            f.ensure(name, width)

    def drop_target(self, name: str) -> None:
        """Forget target ``name`` (its statistics; the features' are kept)."""
        for f in self._folds:
            f.targets.pop(name, None)

    def init(self, dim: int, device: Union[str, torch.device] = "cpu") -> None:
        """Allocate the statistics for ``dim`` features (done by the first :meth:`update` otherwise)."""
        if self.dim is None:
            self._init(dim, torch.device(device))
        elif self.dim != dim:
            raise ValueError(expected("features", f"{self.dim} columns, as before", dim))

    def target_width(self, name: str = DEFAULT_TARGET) -> int:
        if not self._folds or name not in self._folds[0].targets:
            return 0
        return int(self._folds[0].targets[name]["sy"].shape[0])

    @property
    def target_names(self) -> List[str]:
        return sorted(self._folds[0].targets) if self._folds else []

    def update(self, x: Tensor, y: Union[Tensor, Mapping[str, Tensor], None] = None,
               folds: Optional[Tensor] = None) -> None:
        """Add rows ``x`` ``(N, d)`` with targets ``y`` ``(N, t)`` (or ``{name: (N, t_name)}``).

        Args:
            x: features, any float dtype (accumulated in float64).
            y: one target matrix (stored as ``"y"``) or several named ones sharing ``X^T X``;
                a target with more columns than before widens the stored one with zero columns.
            folds: ``(N,)`` fold index in ``[0, k)`` of each row; required when ``cv`` is an int.
        """
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(expected("x", "a tensor of shape (N, d)",
                             x if isinstance(x, Tensor) else type(x).__name__))
        targets = {} if y is None else ({DEFAULT_TARGET: y} if isinstance(y, Tensor) else dict(y))
        for name, t in targets.items():
            if t.ndim == 1:
                targets[name] = t = t.view(-1, 1)
            if t.ndim != 2 or t.shape[0] != x.shape[0]:
                raise ValueError(expected(f"y[{name!r}]", f"a tensor with {x.shape[0]} rows", t))
        if self.dim is None:
            self._init(x.shape[1], x.device)
        elif x.shape[1] != self.dim:
            raise ValueError(expected("x", f"{self.dim} columns, as in earlier updates", x))
        if self.num_folds > 1:
            if folds is None or folds.shape != (x.shape[0],):
                raise ValueError(expected("folds", f"a LongTensor of shape ({x.shape[0]},) for cv={self.cv}", folds))
            groups = [(j, (folds == j).nonzero().squeeze(1)) for j in range(self.num_folds)]
        else:
            groups = [(0, None)]
        x64 = x.detach().to(torch.float64)
        t64 = {k: v.detach().to(device=x64.device, dtype=torch.float64) for k, v in targets.items()}
        for j, idx in groups:
            xs = x64 if idx is None else x64[idx]
            if xs.shape[0] == 0:
                continue
            f = self._folds[j]
            f.n += xs.shape[0]
            f.sx += xs.sum(0)
            f.xtx.addmm_(xs.T, xs)
            for name, t in t64.items():
                ts = t if idx is None else t[idx]
                for g in self._folds:  # keep every fold's target widths equal
                    g.ensure(name, ts.shape[1])
                st = f.targets[name]
                ts = torch.cat([ts, ts.new_zeros(ts.shape[0], st["sy"].shape[0] - ts.shape[1])], 1)
                st["sy"] += ts.sum(0)
                st["xty"].addmm_(xs.T, ts)
                st["yty"] += (ts * ts).sum(0)
        self._version += 1

    def add_cross(self, name: str, xty: Tensor, sy: Tensor, yty: Tensor, fold: int = 0) -> None:
        """Add precomputed target statistics (``X^T Y``, ``sum y``, ``sum y^2``) for rows already counted in ``X^T X``.

        Lets a caller add a target after the rows streamed by (e.g. control labels decided at epoch end).
        """
        self.ensure_target(name, xty.shape[1])
        st = self._folds[fold].targets[name]
        st["xty"] += xty.to(torch.float64)
        st["sy"] += sy.to(torch.float64)
        st["yty"] += yty.to(torch.float64)
        self._version += 1

    def merge(self, other: "StreamingRidge") -> "StreamingRidge":
        """Add ``other``'s statistics to this one (same feature width and cv) and return self."""
        if other.dim is None:
            return self
        if self.num_folds != other.num_folds:
            raise ValueError(expected("other.cv", f"{self.cv!r}", other.cv))
        if self.dim is None:
            self._init(other.dim, other._folds[0].xtx.device)
        for name in other.target_names:
            self.ensure_target(name, other.target_width(name))
        for name in self.target_names:
            other.ensure_target(name, self.target_width(name))
        for f, g in zip(self._folds, other._folds):
            f.n += g.n
            f.sx += g.sx
            f.xtx += g.xtx
            for name, st in g.targets.items():
                for key in ("sy", "xty", "yty"):
                    f.targets[name][key] += st[key]
        self._version += 1
        return self

    def pack(self) -> Tensor:
        """All statistics as one flat float64 tensor (targets in sorted name order), e.g. for an all-reduce sum.

        Every process must have called :meth:`init` and :meth:`ensure_target` with the same widths first.
        """
        if self.dim is None:
            raise RuntimeError("StreamingRidge.pack() needs the feature width: call update() or init() first.")
        return torch.cat([t for f in self._folds for t in f.tensors()])

    def unpack(self, flat: Tensor) -> None:
        """Overwrite the statistics from a tensor laid out as :meth:`pack` returns."""
        offset = 0
        for f in self._folds:
            for t in f.tensors():
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
        if offset != flat.numel():
            raise ValueError(expected("flat", f"{offset} values laid out by pack()", flat))
        self._version += 1

    # ------------------------------------------------------------------ solving
    @staticmethod
    def _combine(folds: Sequence[_Stats], name: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        n = sum(f.n for f in folds)
        sx = sum(f.sx for f in folds)
        xtx = sum(f.xtx for f in folds)
        sy = sum(f.targets[name]["sy"] for f in folds)
        xty = sum(f.targets[name]["xty"] for f in folds)
        yty = sum(f.targets[name]["yty"] for f in folds)
        return n, sx, xtx, sy, xty, yty

    @staticmethod
    def _eigh(n: Tensor, sx: Tensor, xtx: Tensor) -> Tuple[Tensor, Tensor]:
        mx = sx / n
        cov = xtx - n * torch.outer(mx, mx)  # centred X^T X, (d, d)
        cov = 0.5 * (cov + cov.T)
        with single_thread(cov.shape[0] <= SINGLE_THREAD_EIGH_MAX and cov.device.type == "cpu"):
            s, v = torch.linalg.eigh(cov)
        return s.clamp_min(0.0), v

    def _grid(self, s: Tensor) -> Tensor:
        if self.alphas is not None:
            return torch.tensor(self.alphas, dtype=torch.float64)
        scale = float(s.mean()) if float(s.mean()) > 0 else 1.0
        return torch.tensor(DEFAULT_RELATIVE_ALPHAS, dtype=torch.float64) * scale

    def solve(self, target: str = DEFAULT_TARGET, alpha: Optional[float] = None) -> RidgeSolution:
        """Fit the probe for ``target``; choose ``alpha`` by GCV or k-fold unless it is given.

        Raises:
            RuntimeError: when no rows were added (or fewer than two).
            KeyError: for an unknown target name.
        """
        if self.dim is None or self.n < 2:
            raise RuntimeError(f"StreamingRidge.solve() needs at least two rows, but got {self.n}.")
        if target not in self._folds[0].targets:
            raise KeyError(expected("target", "one of " + ", ".join(map(repr, self.target_names)), target))
        n, sx, xtx, sy, xty, yty = self._combine(self._folds, target)
        if self._eig_cache is None or self._eig_cache[0] != self._version:
            self._eig_cache = (self._version,) + self._eigh(n, sx, xtx)
        s, v = self._eig_cache[1], self._eig_cache[2]
        mx, my = sx / n, sy / n
        cxy = xty - n * torch.outer(mx, my)  # (d, t)
        z = v.T @ cxy  # (d, t)
        alphas = self._grid(s).to(s.device)
        if alpha is not None:
            chosen, scores, alphas = float(alpha), torch.empty(
                0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
        elif self.num_folds == 1:
            yy = (yty - n * my * my).sum()
            ratio = (s[:, None] + 2 * alphas[None]) / (s[:, None] + alphas[None]) ** 2  # (d, A)
            rss = (yy - ((z * z).sum(1)[:, None] * ratio).sum(0)).clamp_min(0.0)  # (A,)
            df = 1.0 + (s[:, None] / (s[:, None] + alphas[None])).sum(0)
            resid_df = (n - df).clamp_min(1e-12)
            scores = n * rss / resid_df ** 2
            chosen = float(alphas[int(torch.argmin(scores))])
        else:
            scores = self._kfold_scores(target, alphas)
            chosen = float(alphas[int(torch.argmin(scores))])
        coef = v @ (z / (s + chosen)[:, None])
        return RidgeSolution(coef=coef, intercept=my - mx @ coef, alpha=chosen, alphas=alphas.cpu(),
                             scores=scores.cpu())

    def _kfold_scores(self, target: str, alphas: Tensor) -> Tensor:
        """Mean over folds of the held-out mean squared error (averaged over target columns), per alpha."""
        per_fold = []
        for j, held in enumerate(self._folds):
            if float(held.n) == 0:
                continue
            rest = [f for i, f in enumerate(self._folds) if i != j]
            n, sx, xtx, sy, xty, _ = self._combine(rest, target)
            s, v = self._eigh(n, sx, xtx)
            mx, my = sx / n, sy / n
            z = v.T @ (xty - n * torch.outer(mx, my))
            h = held.targets[target]
            t = sy.shape[0]
            errs = []
            for a in alphas.tolist():
                b = v @ (z / (s + a)[:, None])  # (d, t)
                c = my - mx @ b  # (t,)
                # sum over held-out rows of ||y - X b - c||^2, from the held-out fold's statistics
                sse = (h["yty"].sum() - 2 * (b * h["xty"]).sum() - 2 * (c * h["sy"]).sum()
                       + (b * (held.xtx @ b)).sum() + 2 * (c * (held.sx @ b)).sum() + held.n * (c * c).sum())
                errs.append(sse / (held.n * t))
            per_fold.append(torch.stack(errs))
        return torch.stack(per_fold).mean(0)
