"""Sharing a run's rows over ranks: each rank's contiguous share (:func:`split_rows`) and the shares gathered back
on every rank (:func:`gather_rows`, :func:`gather_shares`). The policy that uses them is
:meth:`~lightning_xai.callbacks.XAICallback.work_split`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Tuple

import torch
from torch import Tensor

from lightning_xai._utils import expected

if TYPE_CHECKING:
    import lightning.pytorch as pl


def split_rows(n: int, world: int, rank: int) -> Tuple[int, int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n`` rows and how many of its results to keep.

    A rank whose share is empty (fewer rows than ranks) still computes one row, the last, so its results
    have the right shapes for the gather; it keeps none of them.
    """
    per_rank = -(-n // world)
    start = min(rank * per_rank, n)
    stop = min(start + per_rank, n)
    if start == stop and n > 0:
        return n - 1, n, 0
    return start, stop, stop - start


def _stack_from_ranks(trainer: "pl.Trainer", tensor: Tensor) -> Tensor:
    """``tensor`` (the same shape on every rank) from every rank, stacked: ``(world, ...)``.

    Under ``torch.distributed`` this is its plain ``all_gather``, not the strategy's: Lightning's goes through the
    autograd ``all_gather`` of ``torch.distributed.nn``, which torch deprecates (a warning on every rank), and we
    need no gradient. gloo has no int16 all_gather: int16 travels as int32. Without a process group the strategy's
    own gather is used.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return trainer.strategy.all_gather(tensor)
    sent = tensor.to(torch.int32) if tensor.dtype == torch.int16 else tensor.contiguous()
    out = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(out, sent)
    return torch.stack(out).to(tensor.dtype)


def gather_rows(trainer: "pl.Trainer", tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (rows may differ per rank) from every rank, rank-major, on every rank.

    The ranks first agree on the trailing shape and dtype: a rank without rows may pass any empty tensor
    (e.g. ``torch.empty(0)``) and takes them from the ranks that have rows. When ranks with rows disagree,
    every rank raises the same ``ValueError``, so none is left waiting in a collective.
    """
    if trainer.world_size <= 1:
        return tensor
    strategy = trainer.strategy
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
              torch.int32, torch.int64, torch.bool)
    max_dims = 8
    # (rows, dtype code, trailing ndim, trailing shape padded with -1); code -1: a tensor no rank can gather
    rows = int(tensor.shape[0]) if tensor.ndim else 0
    code = dtypes.index(tensor.dtype) if tensor.dtype in dtypes and 1 <= tensor.ndim <= max_dims + 1 else -1
    desc = torch.full((3 + max_dims,), -1, dtype=torch.long)
    desc[0], desc[1], desc[2] = rows, code, max(tensor.ndim - 1, 0)
    if code >= 0:
        desc[3: 3 + tensor.ndim - 1] = torch.tensor(tensor.shape[1:], dtype=torch.long)
    table = _stack_from_ranks(trainer, desc.to(strategy.root_device)).view(
        trainer.world_size, -1).cpu()  # (world, 3 + max_dims)
    sizes = table[:, 0].tolist()
    full = [r for r, s in enumerate(sizes) if s > 0]
    if not full:
        return tensor
    ref = table[full[0]]
    if int(ref[1]) < 0 or any(not torch.equal(table[r, 1:], ref[1:]) for r in full):
        seen = {r: (tuple(table[r, 3: 3 + int(table[r, 2])].tolist()),
                    dtypes[int(table[r, 1])] if table[r, 1] >= 0 else "unsupported") for r in full}
        raise ValueError(expected("gather_rows' tensors", f"the same trailing shape and a dtype of {dtypes} on every "
                                  "rank with rows", seen))
    dtype, shape = dtypes[int(ref[1])], tuple(int(s) for s in ref[3: 3 + int(ref[2])])
    if rows == 0:
        tensor = torch.empty((0,) + shape, dtype=dtype, device=tensor.device)
    padded = torch.zeros((int(max(sizes)),) + shape, dtype=dtype, device=strategy.root_device)
    padded[:rows] = tensor.to(strategy.root_device)
    gathered = _stack_from_ranks(trainer, padded)  # (world, max_rows, ...)
    return torch.cat([gathered[r, : int(s)] for r, s in enumerate(sizes)]).to(tensor.device)


def gather_shares(trainer: "pl.Trainer", results: Dict[str, Tensor], keep: int) -> Dict[str, Tensor]:
    """Every rank's share of per-row results, whole on every rank: the first ``keep`` rows of each tensor of
    ``results`` (see :func:`split_rows`) gathered rank-major. Every rank passes the same keys, in the same order."""
    return {k: gather_rows(trainer, v[:keep]) for k, v in results.items()}
