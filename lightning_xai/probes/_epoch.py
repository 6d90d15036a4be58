"""One feature source's probe for one pass over the data: held-out split, control task, fit and predictions.

Rows arrive in batches with a *global sample index* (the position of the sample in the evaluation
set). Every ``holdout_every``-th index is held out; the rest stream into a
:class:`~lightning_xai.probes._ridge.StreamingRidge`, a few thousand rows at a time (one product where one per batch
would cost Python and dispatch per batch, and a bounded copy). Reduced features are kept as float32
(``samples x reduced dim``, never the raw map) so the probe can be scored on the held-out rows and,
for the control task, on its own training rows.

The control task follows Hewitt & Liang (2019, https://arxiv.org/abs/1909.03368): the same labels
shuffled over samples by a fixed permutation from a private generator, so no feature can predict them
and any accuracy above chance on the *training* rows is memorisation. The control probe uses the task
probe's ridge strength (same capacity), and selectivity is task accuracy minus control accuracy.

Pure torch.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._utils import check_choice, check_positive_int, expected
from lightning_xai.probes._logistic import fit_logistic
from lightning_xai.probes._ridge import StreamingRidge, one_hot

CONTROL = "control:"  # prefix of a control target's name
Predictions = Dict[str, Tuple[Tensor, Tensor]]  # split -> (predicted class, true class)
FLUSH_ROWS = 4096  # rows kept pending before their statistics are added: 32 batches of 128 per product


def holdout_mask(index: Tensor, holdout_every: int) -> Tensor:
    """True for held-out rows: global sample index divisible by ``holdout_every``."""
    return index % holdout_every == 0


def control_table(labels: Tensor, seed: int = 0) -> Tensor:
    """Control labels for every sample: ``labels[perm]`` for a fixed permutation drawn from a private generator.

    Args:
        labels: ``(G,)`` labels indexed by global sample index (``-1`` where unknown).
        seed: permutation seed; the same seed gives the same control task on every rank and epoch.

    Returns:
        ``(G,)`` control labels with the same class frequencies as ``labels``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    known = (labels >= 0).nonzero().squeeze(1).cpu()
    perm = known[torch.randperm(known.numel(), generator=gen)]
    out = torch.full_like(labels, -1)
    out[known.to(labels.device)] = labels[perm.to(labels.device)]
    return out


class EpochProbe:
    """Accumulates one feature source (a layer, the input, ...) for one epoch and fits its probes.

    Args:
        alphas: ridge strengths (``None``: relative grid chosen by ``cv``); see :class:`StreamingRidge`.
        cv: ``"gcv"`` or ``k`` for k-fold over the training rows.
        holdout_every: every n-th global sample index is held out for scoring.
        solver: ``"ridge"`` (closed form, streamed) or ``"logistic"`` (L-BFGS on the stored training rows).
        logistic_l2: L2 strength of the logistic solver.

    Example:
        >>> probe = EpochProbe(holdout_every=5)
        >>> x = torch.randn(200, 4); y = (x[:, 0] > 0).long()
        >>> probe.add(x, {"label": y}, torch.arange(200))
        >>> probe.prepare({"label": 2}, {"label": control_table(y)})
        >>> preds = probe.predict()["label"]
        >>> float((preds["holdout"][0] == preds["holdout"][1]).float().mean()) > 0.8
        True
    """

    def __init__(self, alphas: Optional[Sequence[float]] = None, cv: Union[str, int] = "gcv", holdout_every: int = 5,
                 solver: str = "ridge", logistic_l2: float = 1e-3) -> None:
        check_positive_int("holdout_every", holdout_every)
        if holdout_every < 2:
            raise ValueError(expected("holdout_every", "an int >= 2", holdout_every))
        check_choice("solver", solver, ("ridge", "logistic"))
        self.ridge = StreamingRidge(alphas=alphas, cv=cv)
        self.holdout_every = holdout_every
        self.solver = solver
        self.logistic_l2 = logistic_l2
        # batches added since the last _flush: (features (N, k), index (N,), labels {target: (N,)}), copies
        self._pending: List[Tuple[Tensor, Tensor, Dict[str, Tensor]]] = []
        self._pending_rows = 0
        self._train: List[Tensor] = []
        self._hold: List[Tensor] = []
        self._train_index: List[Tensor] = []
        self._hold_index: List[Tensor] = []
        self._train_y: Dict[str, List[Tensor]] = {}
        self._hold_y: Dict[str, List[Tensor]] = {}
        self.num_classes: Dict[str, int] = {}
        self.control: Dict[str, Tuple[Tensor, Tensor]] = {}
        self._nonfinite = torch.zeros((), dtype=torch.long)  # rows with NaN/inf features, added as zeros

    # ------------------------------------------------------------------ accumulation
    def _folds(self, index: Tensor) -> Optional[Tensor]:
        return None if self.ridge.num_folds == 1 else (index // self.holdout_every) % self.ridge.num_folds

    def add(self, features: Tensor, labels: Mapping[str, Tensor], index: Tensor) -> None:
        """Add a batch: features ``(N, k)``, labels ``{target: (N,) int}``, global sample indices ``(N,)``.

        A row with a NaN/inf feature is added as zeros (it would make every statistic NaN) and counted in
        :attr:`nonfinite_rows`. The batch is copied and kept; its statistics are added together with the other
        batches' when they are next needed (one product over all rows instead of one per batch).
        """
        if features.ndim != 2:
            raise ValueError(expected("features", "a tensor of shape (N, k)", features))
        if self.ridge.dim is None:
            self.ridge.init(features.shape[1], features.device)
        elif features.shape[1] != self.ridge.dim:
            raise ValueError(expected("features", f"{self.ridge.dim} columns, as in earlier batches", features))
        # copies: the caller may reuse its buffers (a flattened input is a view of the batch)
        self._pending.append((features.detach().float().clone(), index.detach().long().view(-1).clone(),
                              {k: v.detach().long().view(-1).clone() for k, v in labels.items()}))
        self._pending_rows += features.shape[0]
        if self._pending_rows >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        """Split the pending batches into training and held-out rows and add the training rows' statistics."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        feats = torch.cat([f for f, _, _ in pending])  # (N, k)
        device = feats.device
        index = torch.cat([i.to(device) for _, i, _ in pending])  # (N,)
        names = list(dict.fromkeys(k for _, _, y in pending for k in y))
        # a target missing from a batch is unknown (-1) there: a zero row of its one-hot targets
        unknown = lambda n: torch.full((n,), -1, dtype=torch.long, device=device)  # noqa: E731
        labels = {k: torch.cat([y[k].to(device) if k in y else unknown(f.shape[0]) for f, _, y in pending])
                  for k in names}
        bad = ~torch.isfinite(feats).all(1, keepdim=True)  # (N, 1)
        feats = torch.where(bad, torch.zeros((), dtype=feats.dtype, device=device), feats)
        self._nonfinite = self._nonfinite.to(device) + bad.sum()
        hold = holdout_mask(index, self.holdout_every)
        train = ~hold
        xt = feats[train]
        if xt.shape[0]:
            targets = {k: one_hot(v[train], int(v.max()) + 1) for k, v in labels.items()}
            self.ridge.update(xt, targets, folds=self._folds(index[train]))
        self._train.append(xt)
        self._hold.append(feats[hold])
        self._train_index.append(index[train])
        self._hold_index.append(index[hold])
        for k, v in labels.items():
            self._train_y.setdefault(k, []).append(v[train])
            self._hold_y.setdefault(k, []).append(v[hold])

    def drop_target(self, name: str) -> None:
        """Forget target ``name`` and its control task: its labels and statistics (the features are kept)."""
        for _, _, labels in self._pending:
            labels.pop(name, None)
        for key in (name, CONTROL + name):
            self._train_y.pop(key, None)
            self._hold_y.pop(key, None)
            self.num_classes.pop(key, None)
            self.control.pop(key, None)
            self.ridge.drop_target(key)

    @property
    def nonfinite_rows(self) -> int:
        """Rows added so far whose features held NaN/inf (added as zeros)."""
        self._flush()
        return int(self._nonfinite)

    @property
    def n_train(self) -> int:
        self._flush()
        return sum(t.shape[0] for t in self._train)

    @property
    def n_holdout(self) -> int:
        self._flush()
        return sum(t.shape[0] for t in self._hold)

    def nbytes(self) -> int:
        """Bytes held: stored features and labels plus the ridge statistics."""
        self._flush()
        total = sum(t.numel() * t.element_size()
                    for t in self._train + self._hold + self._train_index + self._hold_index)
        total += sum(t.numel() * t.element_size()
                     for v in list(self._train_y.values()) + list(self._hold_y.values()) for t in v)
        if self.ridge.dim is not None:
            total += self.ridge.pack().numel() * 8
        return total

    def _cat(self, chunks: List[Tensor], width: Optional[int] = None) -> Tensor:
        if len(chunks) == 1:
            return chunks[0]
        if chunks:
            return torch.cat(chunks)
        return torch.empty(0, width or 0)

    # ------------------------------------------------------------------ fitting
    def prepare(self, num_classes: Mapping[str, int], control: Mapping[str, Tensor]) -> None:
        """Fix the class counts and add the control targets' statistics from the stored training rows.

        Args:
            num_classes: classes per target, agreed across processes.
            control: per target, the :func:`control_table` indexed by global sample index.
        """
        self._flush()
        self.num_classes = dict(num_classes)
        x_train = self._cat(self._train)
        train_index = self._cat(self._train_index).long().view(-1)
        hold_index = self._cat(self._hold_index).long().view(-1)
        for name, classes in num_classes.items():
            self.ridge.ensure_target(name, classes)
            table = control[name].to(train_index.device)
            ctrl_train, ctrl_hold = table[train_index], table[hold_index]
            self.control[name] = (ctrl_train, ctrl_hold)
            self.ridge.ensure_target(CONTROL + name, classes)
            if x_train.shape[0] == 0:
                continue
            x64 = x_train.to(torch.float64)
            y64 = one_hot(ctrl_train, classes)
            folds = self._folds(train_index)
            for j in range(self.ridge.num_folds):
                rows = slice(None) if folds is None else (folds == j).nonzero().squeeze(1)
                xs, ys = x64[rows], y64[rows]
                self.ridge.add_cross(CONTROL + name, xs.T @ ys, ys.sum(0), (ys * ys).sum(0), fold=j)

    def pack(self) -> Tensor:
        """The ridge statistics as one flat float64 tensor (sum it across processes, then :meth:`unpack`)."""
        self._flush()
        return self.ridge.pack()

    def unpack(self, flat: Tensor) -> None:
        self.ridge.unpack(flat)

    def predict(self, gather: Optional[Callable[[Tensor], Tensor]] = None) -> Dict[str, Predictions]:
        """Predicted and true classes per target and split, after :meth:`prepare` (and any sync).

        Returns:
            ``{target: {"holdout", "train", "control_holdout", "control_train": (pred, true)}, ...}``
            and, per target, the chosen strength under ``"alpha"`` in :attr:`alphas`.
        """
        self._flush()
        x_train, x_hold = self._cat(self._train), self._cat(self._hold)
        out: Dict[str, Predictions] = {}
        self.alphas: Dict[str, float] = {}
        for name, classes in self.num_classes.items():
            y_train, y_hold = self._cat(self._train_y[name]).long(), self._cat(self._hold_y[name]).long()
            ctrl_train, ctrl_hold = self.control[name]
            if self.solver == "ridge":
                sol = self.ridge.solve(name)
                ctrl = self.ridge.solve(CONTROL + name, alpha=sol.alpha)
                self.alphas[name] = sol.alpha
                predict, predict_ctrl = sol.classify, ctrl.classify
            else:
                g = gather or (lambda t: t)
                xs, ys, cs = g(x_train), g(y_train), g(ctrl_train)
                sol = fit_logistic(xs, ys, classes, l2=self.logistic_l2)
                ctrl = fit_logistic(xs, cs, classes, l2=self.logistic_l2)
                self.alphas[name] = self.logistic_l2
                predict, predict_ctrl = sol.classify, ctrl.classify
            out[name] = {
                "holdout": (predict(x_hold), y_hold),
                "train": (predict(x_train), y_train),
                "control_holdout": (predict_ctrl(x_hold), ctrl_hold),
                "control_train": (predict_ctrl(x_train), ctrl_train),
            }
        return out

    def labels(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        """All rows' global indices ``(N,)`` and labels ``{target: (N,)}`` (training rows first)."""
        self._flush()
        index = torch.cat([self._cat(self._train_index), self._cat(self._hold_index)]).long().view(-1)
        return index, {k: torch.cat([self._cat(self._train_y[k]), self._cat(self._hold_y[k])]).long().view(-1)
                       for k in self._train_y}
