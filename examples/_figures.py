"""What the examples print per epoch: only figures computed at that epoch, "-" for the others.

``trainer.callback_metrics`` keeps every scalar until it is logged again, so an epoch a callback did not explain
(its ``every_n_epochs`` skipped it, or a failure under ``on_error="warn"``) would show that callback's last figures
as if they were new. :func:`current_figures` drops a lightning_xai callback's ``<prefix>/<area>/...`` scalars
unless its ``last_explained_epoch`` is the current epoch. (The examples' modules log their own metrics at every
validation epoch, so those are always current.)
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping

from lightning_xai.callbacks import XAICallback


def current_figures(trainer: Any) -> Dict[str, float]:
    """The scalars of ``trainer.callback_metrics`` computed at ``trainer.current_epoch``."""
    epoch = trainer.current_epoch
    stale = tuple(cb.tag() + "/" for cb in trainer.callbacks
                  if isinstance(cb, XAICallback) and cb.last_explained_epoch != epoch)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith(stale)}


def cell(row: Mapping[str, float], key: str, width: int, spec: str = ".3f", suffix: str = "") -> str:
    """``row[key]`` formatted with ``spec`` (and ``suffix``), right-aligned in ``width``; ``-`` when it is missing."""
    value = row.get(key)
    text = "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"
    return f"{text:>{width}}"
