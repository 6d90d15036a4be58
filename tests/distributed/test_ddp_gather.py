"""gather_rows across simulated ranks (threads sharing an all_gather), without starting processes, and once on
two real gloo processes for every dtype it accepts.

The spawned runs in test_ddp_stack.py cover the callbacks end to end; these cover the gather's own cases:
uneven rows, a rank with an empty tensor of the wrong shape and dtype, all ranks empty, and ranks with rows
that disagree (every rank raises, none is left waiting).
"""
import os
import socket
import threading

import pytest
import torch

from lightning_xai.callbacks._ranks import gather_rows


class _Group:
    def __init__(self, world):
        self.barrier = threading.Barrier(world, timeout=20)  # a rank left waiting fails the test, never hangs it
        self.slots = [None] * world
        self.calls = 0


class _Strategy:
    """``all_gather`` like Lightning's DDP strategy: same-shaped tensors stacked as ``(world, ...)``."""

    root_device = torch.device("cpu")

    def __init__(self, group, rank):
        self.group, self.rank = group, rank

    def all_gather(self, tensor):
        g = self.group
        g.slots[self.rank] = tensor.clone()
        g.barrier.wait()
        shapes = {tuple(t.shape) for t in g.slots}
        dtypes = {t.dtype for t in g.slots}
        out = torch.stack(g.slots) if len(shapes) == 1 and len(dtypes) == 1 else None
        if self.rank == 0:
            g.calls += 1
        g.barrier.wait()
        if out is None:  # what gloo does with mismatched shapes: an error or a hang
            raise RuntimeError(f"all_gather of mismatched tensors {shapes} {dtypes}")
        return out


class _Trainer:
    def __init__(self, group, rank, world):
        self.strategy, self.world_size, self.global_rank = _Strategy(group, rank), world, rank


def _gather(tensors):
    """``gather_rows`` on every simulated rank; returns each rank's result or exception, and the collectives run."""
    world = len(tensors)
    group = _Group(world)
    out = [None] * world

    def run(rank):
        try:
            out[rank] = gather_rows(_Trainer(group, rank, world), tensors[rank])
        except Exception as err:  # noqa: BLE001 - compared below
            out[rank] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out, group.calls


def test_uneven_rows_are_concatenated_rank_major():
    a, b = torch.arange(8.0).view(4, 2), torch.arange(8.0, 14.0).view(3, 2)
    out, _ = _gather([a, b])
    for res in out:
        assert torch.equal(res, torch.cat([a, b]))


@pytest.mark.parametrize("empty", [pytest.param(torch.empty(0), id="empty-1d-float32"),
                                   pytest.param(torch.zeros(0, 5, dtype=torch.int64), id="empty-wrong-shape-int64")])
def test_a_rank_without_rows_takes_shape_and_dtype_from_the_others(empty):
    rows = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    out, _ = _gather([rows, empty, rows[:1]])
    for res in out:
        assert res.dtype == torch.float64 and res.shape == (4, 1, 2, 2)
        assert torch.equal(res, torch.cat([rows, rows[:1]]))


def test_the_old_gather_failed_on_an_empty_rank():
    """What gather_rows fixes: padding each rank's own tensor gives mismatched shapes in the all_gather."""
    group = _Group(2)
    errors = []

    def old(rank, tensor):
        strategy = _Strategy(group, rank)
        try:
            sizes = strategy.all_gather(torch.tensor([tensor.shape[0]])).view(-1).tolist()
            padded = tensor.new_zeros((int(max(sizes)),) + tuple(tensor.shape[1:]))
            strategy.all_gather(padded)
        except RuntimeError as err:
            errors.append(err)

    threads = [threading.Thread(target=old, args=(0, torch.ones(2, 3))),
               threading.Thread(target=old, args=(1, torch.empty(0)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 2


def test_all_ranks_empty_returns_without_a_second_collective():
    out, calls = _gather([torch.empty(0), torch.empty(0, 3)])
    assert calls == 1
    assert out[0].numel() == 0 and out[1].shape == (0, 3)


def test_ranks_that_disagree_all_raise():
    out, calls = _gather([torch.zeros(2, 3), torch.zeros(1, 4), torch.empty(0)])
    assert all(isinstance(res, ValueError) for res in out), out
    assert "trailing shape" in str(out[0]) and calls == 1  # decided from the first (shape) gather
    out, _ = _gather([torch.zeros(2, 3), torch.zeros(1, 3, dtype=torch.int32)])
    assert all(isinstance(res, ValueError) for res in out), out


def test_one_process_returns_the_tensor_itself():
    class One:
        world_size = 1

    t = torch.ones(2)
    assert gather_rows(One(), t) is t


GATHER_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
                 torch.int32, torch.int64, torch.bool)


def _gloo_rank(rank, port, folder):
    """One of two gloo processes: gather_rows of rank-dependent rows (rank r has r + 1 rows) in every dtype."""
    dist = torch.distributed
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        trainer = _Trainer(None, rank, 2)  # no strategy gather is used: a process group exists
        trainer.strategy.all_gather = None
        out = {str(dt): gather_rows(trainer, (torch.arange(2 * (rank + 1)).view(-1, 2) + 10 * rank).to(dt))
               for dt in GATHER_DTYPES}
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_every_dtype_gathers_on_real_gloo_processes(tmp_path):
    """gloo itself refuses an int16 all_gather ("Invalid scalar type"): gather_rows sends it as int32."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_rank, args=(port, str(tmp_path)), nprocs=2)
    rows = torch.cat([torch.arange(2).view(1, 2), torch.arange(4).view(2, 2) + 10])
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for dt in GATHER_DTYPES:
            assert out[str(dt)].dtype == dt and torch.equal(out[str(dt)], rows.to(dt)), (rank, dt)
