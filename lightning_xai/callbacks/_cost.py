"""What explaining costs during one fit, for every lightning_xai callback of a Trainer.

Callbacks never skip a scheduled epoch to save time; they report the cost instead. Each run's wall time
(its forward/backward passes, fitting, rendering and logging) is charged to the callback's row of the
Trainer's :class:`CostBook`; each run logs it as ``<prefix>/<area>/seconds``, and at the end of ``fit`` rank
zero prints one table: callback, runs, seconds, and share of the fit's wall time (from the first callback's
``setup`` to the first ``teardown``). The table goes to the ``lightning_xai`` logger at INFO level, printed to
standard output like Lightning's own messages; ``logging.getLogger("lightning_xai").setLevel(logging.WARNING)``
silences it.
"""
from __future__ import annotations

import logging
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

log = logging.getLogger("lightning_xai")
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)
if not log.hasHandlers():  # the way Lightning shows its own INFO messages, unless the user configured logging
    _handler = logging.StreamHandler(sys.stdout)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.propagate = False


@dataclass
class CostBook:
    """Seconds spent explaining during one fit, per callback (keyed by ``id(callback)``)."""

    start: float = field(default_factory=time.perf_counter)
    names: Dict[int, str] = field(default_factory=dict)
    runs: Dict[int, int] = field(default_factory=dict)
    seconds: Dict[int, float] = field(default_factory=dict)  # all runs and one-off costs
    current: Dict[int, float] = field(default_factory=dict)  # the current (or last) run
    finished: bool = False

    def register(self, key: int, name: str) -> None:
        self.names[key] = name
        self.runs.setdefault(key, 0)
        self.seconds.setdefault(key, 0.0)

    def begin(self, key: int) -> None:
        """A run of callback ``key`` starts."""
        self.runs[key] = self.runs.get(key, 0) + 1
        self.current[key] = 0.0

    def charge(self, key: int, seconds: float, run: bool = True) -> None:
        """Add ``seconds`` to callback ``key``'s total and (``run``) to its current run."""
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        if run:
            self.current[key] = self.current.get(key, 0.0) + seconds

    def rows(self, now: Optional[float] = None) -> List[List[Any]]:
        """``[callback, runs, seconds, share of the fit's wall time]`` per callback, in registration order."""
        wall = max((time.perf_counter() if now is None else now) - self.start, 1e-9)
        return [[name, self.runs.get(key, 0), self.seconds.get(key, 0.0), self.seconds.get(key, 0.0) / wall]
                for key, name in self.names.items()]

    def table(self, now: Optional[float] = None) -> str:
        rows = self.rows(now)
        width = max([len("callback")] + [len(r[0]) for r in rows])
        lines = [f"{'callback':<{width}}  runs   seconds  share of fit"]
        lines += [f"{name:<{width}}  {runs:>4}  {secs:>8.2f}  {share:>11.1%}" for name, runs, secs, share in rows]
        if len(rows) > 1:
            total = sum(r[2] for r in rows)
            lines.append(f"{'total':<{width}}  {sum(r[1] for r in rows):>4}  {total:>8.2f}  "
                         f"{sum(r[3] for r in rows):>11.1%}")
        return "\n".join(lines)


_BOOKS: "weakref.WeakKeyDictionary[Any, CostBook]" = weakref.WeakKeyDictionary()


def book(trainer: Any, new_fit: bool = False) -> CostBook:
    """The trainer's cost book; ``new_fit=True`` starts a fresh one unless this fit already has one."""
    found = _BOOKS.get(trainer)
    if found is None or (new_fit and found.finished):
        found = _BOOKS[trainer] = CostBook()
    return found


def print_table(cost_book: CostBook) -> None:
    """Print the end-of-fit table (call on rank zero)."""
    log.info("lightning_xai: time spent explaining during fit\n%s", cost_book.table())
