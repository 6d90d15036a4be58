"""Reading Lightning's batches and choosing a probe set from them.

:func:`extract_xy` finds inputs and labels in a batch; :func:`collect_rows` keeps candidates per class as the
validation batches pass; :func:`choose_stratified` picks the probe set from them, the same on every rank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from lightning_xai._utils import expected
from lightning_xai.callbacks._ranks import gather_rows
from lightning_xai._logging import warn_once

if TYPE_CHECKING:
    import lightning.pytorch as pl

BatchToXY = Callable[[Any], Tuple[Tensor, Optional[Tensor]]]
_X_KEYS = ("x", "input", "inputs", "image", "images", "data", "input_ids")
_Y_KEYS = ("y", "label", "labels", "target", "targets")


def extract_xy(batch: Any, batch_to_xy: Optional[BatchToXY] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Inputs and labels from a batch: ``(x, y, ...)`` tuples/lists, dicts with common keys, a bare tensor,
    or whatever ``batch_to_xy(batch)`` returns.

    Raises:
        ValueError: when the batch format is not understood; the message says how to pass ``batch_to_xy``.
    """
    if batch_to_xy is not None:
        out = batch_to_xy(batch)
        if isinstance(out, Tensor):
            return out, None
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor)):
            raise ValueError(expected("batch_to_xy(batch)",
                             "a tensor or a pair (inputs, labels or None)", type(out).__name__))
        return out[0], out[1]
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], y
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _X_KEYS if k in batch and isinstance(batch[k], Tensor)), None)
        y = next((batch[k] for k in _Y_KEYS if k in batch and isinstance(batch[k], Tensor)), None)
        if x is not None:
            return x, y
        keys = list(batch.keys())
    else:
        keys = type(batch).__name__
    raise ValueError(
        expected("batch", f"a tensor, a tuple/list (inputs, labels, ...) or a dict with one of the keys {_X_KEYS}; "
                 "pass `batch_to_xy=lambda batch: (inputs, labels)` for other formats", keys)
    )


BATCH_FIX = ("pass `batch_to_xy=lambda batch: (inputs, labels)` for batches that are not (inputs, labels, ...) "
             "tuples or dicts with common keys")


def class_labels(y: Optional[Tensor], n: int, owner: Any = None) -> Optional[Tensor]:
    """``y`` when it holds one class index per sample (shape ``(n,)``, integer or integral values), else None with
    a one-time warning: multi-label ``(n, classes)`` or per-pixel targets are not classes to stratify or explain by
    (``target="label"`` then explains the prediction)."""
    if y is None:
        return None
    if y.ndim == 1 and y.shape[0] == n and (not y.is_floating_point() or bool((y == y.round()).all())):
        return y
    warn_once("not-classes", f"{type(owner).__name__ if owner is not None else 'lightning_xai'}: the labels of the "
              f"validation batches (shape {tuple(y.shape)}) are not one class index per sample; they are ignored "
              "(the probe set is chosen without classes, and target='label' explains the predicted class).",
              owner=owner)
    return None


def first_loader(loaders: Any) -> Any:
    """The first of Lightning's dataloaders (a loader, or a list/tuple of them; None when there are none)."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


Buckets = Dict[int, List[Tuple[Tensor, Optional[Tensor]]]]  # class (-1: no labels) -> (sample, label) in loading order


def collect_rows(buckets: Buckets, x: Tensor, y: Optional[Tensor], per_class: int) -> None:
    """Add CPU copies of the rows of a batch to ``buckets``, at most ``per_class`` per class, in loading order."""
    labels = torch.full((x.shape[0],), -1, dtype=torch.long) if y is None else y.detach().view(-1).long().cpu()
    for key in labels.unique().tolist():  # per class: one copy of the rows still wanted
        bucket = buckets.setdefault(int(key), [])
        wanted = per_class - len(bucket)
        if wanted > 0:
            rows = (labels == key).nonzero().view(-1)[:wanted]
            label = None if y is None else torch.tensor(int(key))
            bucket.extend((row, label) for row in x.detach()[rows.to(x.device)].cpu().clone().unbind(0))


def _stratified(buckets: Buckets, n: int) -> Tuple[Tensor, Optional[Tensor]]:
    """Round-robin over sorted classes, each class in loading order; rows grouped by class."""
    ordered = [buckets[k] for k in sorted(buckets)]
    chosen: List[Tuple[Tensor, Optional[Tensor]]] = []
    depth = 0
    while len(chosen) < n and any(depth < len(b) for b in ordered):
        chosen.extend(b[depth] for b in ordered if depth < len(b))
        depth += 1
    chosen = chosen[:n]
    if not chosen:
        return torch.empty(0), None
    has_y = chosen[0][1] is not None
    order = sorted(range(len(chosen)), key=lambda i: int(chosen[i][1]) if has_y else i)
    x = torch.stack([chosen[i][0] for i in order])
    y = torch.stack([chosen[i][1] for i in order]) if has_y else None
    return x, y


def choose_stratified(trainer: "pl.Trainer", buckets: Buckets, n: int) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``n`` rows chosen stratified by class from ``buckets`` (see :func:`collect_rows`), identical on every rank:
    under DDP every rank saw a different shard, so all candidates are gathered and chosen from again. ``(None, None)``
    when no rank has any."""
    if trainer.world_size <= 1:
        x, y = _stratified(buckets, n)
        return (None, None) if x.numel() == 0 else (x, y)
    try:  # a rank that fails here still joins the first collective, where every rank learns of it
        x, y = _stratified(buckets, n)
        local_error: Optional[Exception] = None
    except Exception as err:  # noqa: BLE001 - re-raised on every rank below
        x, y, local_error = torch.empty(0), None, err
    status = torch.tensor([x.shape[0], int(local_error is not None)], device=trainer.strategy.root_device)
    count, failures = (int(v) for v in trainer.strategy.reduce(status, reduce_op="sum").tolist())
    if failures:
        raise local_error if local_error is not None else RuntimeError(
            f"another rank failed to choose its probe-set candidates ({failures} of {trainer.world_size} ranks)")
    if count == 0:
        return None, None
    x_all = gather_rows(trainer, x)
    y_all = gather_rows(trainer, y if y is not None else torch.full((x.shape[0],), -1, dtype=torch.long))
    merged: Buckets = {}
    for i in range(x_all.shape[0]):
        key = int(y_all[i])
        bucket = merged.setdefault(key, [])
        if len(bucket) < n:
            bucket.append((x_all[i], None if key < 0 else y_all[i]))
    x, y = _stratified(merged, n)
    return (None, None) if x.numel() == 0 else (x, y)
