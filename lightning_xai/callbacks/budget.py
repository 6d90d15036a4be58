"""The overhead budget shared by every lightning_xai callback of one Trainer.

Explaining a model costs time, and on a small model explaining every epoch can cost more than the
training itself. By default (``max_overhead=0.1``) the callbacks of one Trainer *together* spend at most
about 10 % of the fit's wall time explaining: before a run, a callback checks the shared ledger and
skips the epoch when the time already spent plus its own last run's cost would exceed
``HEADROOM`` (0.55) x ``max_overhead`` times the time spent training so far (the rest of ``max_overhead``
is left for costs the ledger cannot see). Before its first run a callback's cost is
estimated from the work it declares (:meth:`~lightning_xai.callbacks.base.XAICallback.estimated_work`,
in sample passes) times the training time per training sample so far; a callback that declares none is
assumed to cost the mean of the other callbacks' runs (nothing when none has run yet), and waits while
another callback has a run at the same epoch. Callbacks take
turns: one yields to another that has explained fewer epochs and was skipped since (the budget saves up
for it), whatever their order in ``Trainer(callbacks=...)``, unless that one costs more than the whole
budget of the training so far. So the budget can be overshot by a first run
that costs more than its estimate.
Validation and test runs (``trainer.validate``/``trainer.test``) are never skipped.

The environment variable ``LIGHTNING_XAI_MAX_OVERHEAD`` sets the default for callbacks built without
``max_overhead``: a float, or ``none`` to explain on every scheduled epoch.
"""
from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lightning_xai._utils import expected

ENV = "LIGHTNING_XAI_MAX_OVERHEAD"
DEFAULT_MAX_OVERHEAD = 0.1
#: Share of ``max_overhead`` the callbacks plan to spend on the time the ledger measures. The rest is headroom
#: for what it cannot see: Lightning dispatches ~7 hooks per training step to every callback (~1 us each), the
#: first training steps after a run are slower while caches and allocator pools refill (~2 ms per run on the
#: benchmark's CNN), the logger's writer thread. On ``bench/overhead.py`` (2 ms training steps) these measured
#: 3-5 % of the fit with the default stack, hence 0.55; on models with longer steps they shrink, and the
#: callbacks explain less than ``max_overhead`` would allow.
HEADROOM = 0.55


def check_max_overhead(value: Any) -> Optional[float]:
    """``None`` or a float in ``(0, inf)``; raises ``ValueError`` naming the value otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(expected("max_overhead", "None (no budget) or a positive float such as 0.1 (10 % of the "
                                  "training time)", value))
    return float(value)


def default_max_overhead() -> Optional[float]:
    """``DEFAULT_MAX_OVERHEAD`` unless ``LIGHTNING_XAI_MAX_OVERHEAD`` says otherwise."""
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_OVERHEAD
    if raw.strip().lower() in ("none", "off", "inf"):
        return None
    try:
        return check_max_overhead(float(raw))
    except ValueError:
        raise ValueError(expected(f"the environment variable {ENV}", "a positive float or 'none'", raw)) from None


@dataclass
class Ledger:
    """Time spent explaining during one fit, by all lightning_xai callbacks of a Trainer."""

    start: float = field(default_factory=time.perf_counter)
    spent: float = 0.0
    cost: Dict[int, float] = field(default_factory=dict)  # id(callback) -> seconds of its last run
    total: Dict[int, float] = field(default_factory=dict)  # id(callback) -> seconds of all its runs
    runs: Dict[int, List[int]] = field(default_factory=dict)  # id(callback) -> epochs it explained
    skipped: Dict[int, List[int]] = field(default_factory=dict)  # id(callback) -> epochs the budget skipped
    names: Dict[int, str] = field(default_factory=dict)
    work: Dict[int, float] = field(default_factory=dict)  # id(callback) -> sample passes of one run, where known
    rows: Optional[int] = 0  # training samples seen this fit (None: the batches could not be counted)
    counter: Optional[int] = None  # id of the callback that counts them
    finished: bool = False

    def training_seconds(self, now: Optional[float] = None) -> float:
        """Wall time since the fit started, minus the time spent explaining."""
        now = time.perf_counter() if now is None else now
        return max(now - self.start - self.spent, 0.0)

    def allows(self, key: int, max_overhead: float, epoch: Optional[int] = None, now: Optional[float] = None) -> bool:
        """Whether a run of callback ``key`` at ``epoch`` keeps explaining within ``max_overhead`` of the training
        time. The run is expected to cost :meth:`expected_cost`; a callback that has never run waits while another
        callback has a run at the same epoch whose cost may not be charged yet; and callbacks take turns (see
        the module docstring)."""
        if key not in self.cost and epoch is not None and any(
                other != key and epochs and epochs[-1] == epoch for other, epochs in self.runs.items()):
            return False
        allowance = max_overhead * self.training_seconds(now)
        if self.spent + self.expected_cost(key, now) > allowance:
            return False
        # take turns: a callback yields to one that has explained fewer epochs and was skipped since, so that the
        # budget saves up for it, unless that one costs more than the whole budget of the training so far (it
        # could not run even then, and must not block the others)
        mine = len(self.runs.get(key, []))
        for other, skipped in self.skipped.items():
            theirs = self.runs.get(other, [])
            if other != key and len(theirs) < mine and skipped and (not theirs or skipped[-1] > theirs[-1]) \
                    and self.expected_cost(other, now) <= allowance:
                return False
        return True

    def expected_cost(self, key: int, now: Optional[float] = None) -> float:
        """The cost of callback ``key``'s last run. For one that has never run: its declared work (sample passes)
        times the training time per sample seen so far (one training sample costs a forward, a backward and
        the optimizer step, plus the fit's validation, so this errs high); if either is unknown, the mean of
        the others' last runs (nothing when none has run)."""
        if key in self.cost:
            return self.cost[key]
        if self.work.get(key) is not None and self.rows:
            return self.work[key] * self.training_seconds(now) / self.rows
        return sum(self.cost.values()) / len(self.cost) if self.cost else 0.0

    def count_rows(self, key: int, rows: Optional[int]) -> None:
        """Training samples of one batch, counted by the first callback that calls (``None``: uncountable)."""
        if self.counter is None:
            self.counter = key
        if self.counter == key and self.rows is not None:
            self.rows = None if rows is None else self.rows + rows

    def begin(self, key: int, epoch: int) -> None:
        """A run of callback ``key`` starts: its cost is measured afresh."""
        self.cost[key] = 0.0
        self.runs.setdefault(key, []).append(epoch)

    def charge(self, key: int, seconds: float, run: bool = True) -> None:
        """Add ``seconds`` of explaining to the total and (``run``) to the current run of callback ``key``;
        ``run=False`` for a one-off cost outside any run (e.g. copying the model at fit start)."""
        self.spent += seconds
        if run:
            self.cost[key] = self.cost.get(key, 0.0) + seconds
        self.total[key] = self.total.get(key, 0.0) + seconds

    def summary(self) -> str:
        rows = []
        for key, name in self.names.items():
            runs, skipped = self.runs.get(key, []), self.skipped.get(key, [])
            if set(skipped) - set(runs):
                rows.append(f"{name} explained {len(set(runs))} of {len(set(runs) | set(skipped))} scheduled epochs "
                            f"(epochs {sorted(set(runs)) if runs else 'none'})")
        return "; ".join(rows)


_LEDGERS: "weakref.WeakKeyDictionary[Any, Ledger]" = weakref.WeakKeyDictionary()


def ledger(trainer: Any, new_fit: bool = False) -> Ledger:
    """The trainer's ledger; ``new_fit=True`` starts a fresh one unless this fit already has one."""
    book = _LEDGERS.get(trainer)
    if book is None or (new_fit and book.finished):
        book = _LEDGERS[trainer] = Ledger()
    return book
