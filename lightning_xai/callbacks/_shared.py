"""Work shared between the callbacks of one Trainer: the same attribution (or logits) of the same probe rows is
computed once per model state.

AttributionMonitor and ShortcutMonitor both explain probe samples with saliency at every epoch, and their probe
sets overlap: both are chosen stratified by class from the same validation batches, so the smaller set is the first
rows of each class of the larger one. :func:`attribute` answers ``fn(forward, x, target, **options)`` with the rows
another callback already computed for the same model state, method, options, logits function and target, and
computes only the rows it has not seen; :func:`logits` does the same for the prediction's forward.

A row is reused only when its input matches bit for bit (a 128-bit BLAKE2 digest of its bytes) and its target is the
same class. The attribution cores are per-sample in eval mode (a row's map does not depend on its batch-mates), so the
figures are those of an unshared run, up to the rounding of kernels whose arithmetic depends on the batch size (a
GEMM's tail rows: at most 6e-10 on a small CNN's saliency maps, the same as the cores' ``batch_size`` option).

The store is weakly keyed by the Trainer (like :func:`lightning_xai.callbacks._cost.book`) and holds one model state
at a time: the stage, epoch and global step, and a fingerprint of the values of every parameter and buffer (so
weights edited by hand between two ``validate()`` calls are not mistaken for the old ones). Asking under a new state
drops what the old one held.
"""
from __future__ import annotations

import contextlib
import hashlib
import weakref
from typing import Any, Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from lightning_xai._logging import warn_once

Result = Union[Tensor, Tuple[Tensor, ...]]
RowKey = Tuple[bytes, Optional[int]]

_ENABLED = [True]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """No sharing inside the block: every call computes all of its rows (for tests and benchmarks)."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


class _Table:
    """One kind of work's rows: row key -> that row of each output; whether the work returns a tuple."""

    def __init__(self) -> None:
        self.rows: Dict[RowKey, Tuple[Tensor, ...]] = {}
        self.is_tuple = False


class _Store:
    """One model state's results, per kind of work."""

    def __init__(self) -> None:
        self.state: Optional[Hashable] = None
        self.tables: Dict[Hashable, _Table] = {}
        self.computed = 0  # rows computed through the store (tests count them)
        self.reused = 0  # rows answered from it


_STORES: "weakref.WeakKeyDictionary[Any, _Store]" = weakref.WeakKeyDictionary()


def store(trainer: Any) -> _Store:
    """The trainer's store (created on first use)."""
    found = _STORES.get(trainer)
    if found is None:
        found = _STORES[trainer] = _Store()
    return found


def _model_state(trainer: Any, pl_module: Any) -> Hashable:
    """The stage, epoch and global step, and a fingerprint of every parameter and buffer (see :func:`_fingerprint`)."""
    return (id(pl_module), str(getattr(trainer.state, "fn", None)), trainer.current_epoch, trainer.global_step,
            _fingerprint(list(pl_module.parameters()) + list(pl_module.buffers())))


_ROW = 1024  # the fingerprint reads a tensor as rows of this many values


@torch.no_grad()
def _fingerprint(tensors: List[Tensor]) -> Tuple[float, ...]:
    r"""Per tensor, the sum of its values and a position-weighted sum, in the tensor's dtype (at least float32).

    The tensor is read as rows of :data:`_ROW` values (a last, shorter row for the rest); the weighted sum is
    :math:`\sum_r (r + 1) \sum_j (j + 1) t_{rj}`. Weights written in place (by hand, between two ``validate()``
    calls) change it, with public operations only, and a permutation of the values changes the weighted sum; an
    edit that changes neither sum after rounding goes unseen. It costs two matrix-vector products over the weights
    (about 1 ms per million float32 parameters on one CPU thread, measured). A sharded tensor contributes its local
    shard (``DTensor.to_local``): each rank keys its own store.
    """
    sums = []
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        flat = local.detach().reshape(-1)
        if not flat.is_floating_point():
            flat = flat.double()  # integer buffers (BatchNorm's counter): small
        elif flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # a half-precision ramp would not count past 2048
        rows = flat.numel() // _ROW
        ramp = torch.arange(1, _ROW + 1, dtype=flat.dtype, device=flat.device)
        full, rest = flat[: rows * _ROW].view(rows, _ROW), flat[rows * _ROW:]  # views: (rows, _ROW), (< _ROW,)
        row_sums = torch.cat([full.sum(1), rest.sum().view(1)])  # (rows + 1,)
        row_weighted = torch.cat([full @ ramp, (rest @ ramp[: rest.numel()]).view(1)])
        row_ramp = torch.arange(1, rows + 2, dtype=flat.dtype, device=flat.device)
        sums.append(torch.stack([row_sums.sum(), row_weighted @ row_ramp]))
    return tuple(torch.cat(sums).tolist()) if sums else ()


def _value_key(value: Any) -> Optional[Hashable]:
    """A hashable stand-in for an option value that fixes the result, or None when it cannot be keyed (a
    ``torch.Generator`` advances as it is used, so a call with one is never shared)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        keys = [_value_key(v) for v in value]
        return None if any(k is None for k in keys) else (type(value).__name__, tuple(keys))
    if isinstance(value, Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), str(value.device), _digest(value.reshape(1, -1))[0])
    return None


def _options_key(options: Mapping[str, Any]) -> Optional[Hashable]:
    keys = [(name, _value_key(v)) for name, v in sorted(options.items())]
    return None if any(k is None for _, k in keys) else tuple(keys)


def _digest(rows: Tensor) -> List[bytes]:
    """A 128-bit digest of each row's bytes."""
    flat = rows.detach().reshape(rows.shape[0], -1).contiguous().cpu()
    raw = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)  # (N, bytes per row)
    return [hashlib.blake2b(r.numpy().tobytes(), digest_size=16).digest() for r in raw]


def _row_targets(target: Any, n: int) -> Optional[List[Optional[int]]]:
    """Per-row classes, or None when ``target`` is not a class per row (a callable, a score tensor)."""
    if target is None:
        return [None] * n
    if isinstance(target, int) and not isinstance(target, bool):
        return [target] * n
    if isinstance(target, Tensor) and target.shape == (n,) and not target.is_floating_point():
        return [int(t) for t in target.tolist()]
    return None


def _forward_key(owner: Any, pl_module: Any) -> Optional[Hashable]:
    """What makes ``owner.logits_fn(pl_module)``'s logits: the module, ``output_key`` and a user ``forward``."""
    key = (id(pl_module), getattr(owner, "output_key", None), getattr(owner, "forward", None))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _as_tuple(out: Any, n: int) -> Optional[Tuple[Tensor, ...]]:
    parts = out if isinstance(out, tuple) else (out,)
    if all(isinstance(p, Tensor) and p.ndim >= 1 and p.shape[0] == n for p in parts):
        return tuple(parts)
    return None


def reuse(owner: Any, pl_module: Any, work: Hashable, x: Tensor, target: Any,
          compute: Callable[[Tensor, Any], Result]) -> Result:
    """``compute(x, target)``, with the rows the trainer's store already holds for ``work`` taken from it.

    Args:
        owner: the calling callback (its ``output_key``/``forward`` are part of the key).
        pl_module: the model explained; it must be attached to a Trainer for anything to be shared.
        work: what is computed, e.g. ``("saliency", fn, options_key)``; None computes without sharing.
        x: the rows ``(N, ...)``.
        target: None, a class index or a LongTensor ``(N,)``; anything else computes without sharing.
        compute: ``(rows, their targets) -> a tensor or a tuple of tensors with one row per input row``.

    Returns:
        What ``compute(x, target)`` returns, row for row.
    """
    n = x.shape[0]
    try:
        trainer = pl_module.trainer
    except (RuntimeError, AttributeError):  # not attached to a Trainer, or not a LightningModule
        trainer = None
    targets = _row_targets(target, n)
    fkey = _forward_key(owner, pl_module)
    if not _ENABLED[-1] or trainer is None or work is None or targets is None or fkey is None or n == 0:
        return compute(x, target)
    shelf = store(trainer)
    state = _model_state(trainer, pl_module)
    if shelf.state != state:
        shelf.state, shelf.tables = state, {}
    table = shelf.tables.setdefault((work, fkey, str(x.dtype), tuple(x.shape[1:]), str(x.device)), _Table())
    keys = list(zip(_digest(x), targets))
    missing = [i for i, k in enumerate(keys) if k not in table.rows]
    if missing:
        idx = torch.tensor(missing, device=x.device)
        whole = len(missing) == n
        out = compute(x, target) if whole else compute(x[idx], target[idx] if isinstance(target, Tensor) else target)
        parts = _as_tuple(out, len(missing))
        if parts is None:  # not rows: nothing to keep
            return out if whole else compute(x, target)
        table.is_tuple = isinstance(out, tuple)
        shelf.computed += len(missing)
        kept = tuple(p.detach().clone() for p in parts)  # the caller may write into what it gets back
        for j, i in enumerate(missing):
            table.rows[keys[i]] = tuple(p[j] for p in kept)
        if whole:
            return out
    shelf.reused += n - len(missing)
    rows = [table.rows[k] for k in keys]
    stacked = tuple(torch.stack([r[j] for r in rows]) for j in range(len(rows[0])))  # each (N, ...)
    return stacked if table.is_tuple else stacked[0]


def attribute(owner: Any, pl_module: Any, method: Tuple[str, Callable, Mapping[str, Any]],
              forward: Callable[[Tensor], Tensor], x: Tensor, target: Any) -> Result:
    """``fn(forward, x, target, **options)`` for ``method = (name, fn, options)``, each row computed once per model
    state among the trainer's callbacks (see the module docstring)."""
    name, fn, options = method
    okey = _options_key(options)
    try:
        hash(fn)
    except TypeError:
        okey = None
    work = None if okey is None else ("attribution", name, fn, okey)
    return reuse(owner, pl_module, work, x, target, lambda rows, t: fn(forward, rows, t, **options))


def logits(owner: Any, pl_module: Any, forward: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``forward(x)`` without gradients, each row computed once per model state among the trainer's callbacks (a
    warning, once per callback, when some are not finite: :func:`warn_not_finite`)."""
    def run(rows: Tensor, _: Any) -> Tensor:
        with torch.no_grad():
            return forward(rows)

    out = reuse(owner, pl_module, ("logits",), x, None, run)
    warn_not_finite(owner, pl_module, out, "outputs (logits)")
    return out


def warn_not_finite(owner: Any, pl_module: Any, values: Tensor, what: str, rows: str = "samples") -> None:
    """Warn once per ``owner`` (a callback) when ``values`` ``(N, ...)``, one row per sample, hold NaN or inf: the
    predictions, maps and tests made from them mean nothing, and a model whose outputs are not finite has usually
    diverged. ``rows``: what a row is, in the message."""
    if not isinstance(values, Tensor) or values.ndim == 0 or values.shape[0] == 0 or bool(torch.isfinite(values).all()):
        return
    bad = int((~torch.isfinite(values.reshape(values.shape[0], -1))).any(1).sum())
    epoch = getattr(pl_module, "current_epoch", None)
    warn_once("not-finite", f"{type(owner).__name__}: the model's {what} are NaN or infinite for {bad} of "
                            f"{values.shape[0]} {rows}" + (f" at epoch {epoch}" if epoch is not None else "")
              + "; what it shows for them means nothing (has training diverged?). Warned once.", owner=owner)
