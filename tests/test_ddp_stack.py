"""Every probe-set callback together under DDP (2 gloo processes on CPU): it finishes, logs once, gives the
same figures as one process, and does not deadlock when the ranks get unequal shares of the probe set."""
import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from helpers import DigitsModule, digits_data, read_events, small_cnn, tiny_trainer
from lightning_xai import AttributionMonitor, ProjectionMonitor, SampleInfluenceMonitor, ShortcutMonitor
from torch.utils.data import DataLoader


class DumpMetrics(Callback):
    def __init__(self, path):
        self.path = path

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("xai/")}
            metrics["world_size"] = trainer.world_size
            with open(self.path, "w", encoding="utf-8") as fh:
                json.dump(metrics, fh)


def _run(tmp_path, name, **kwargs):
    pl.seed_everything(0)
    train, val = digits_data(n_train=128, n_val=200)
    probe = (val.tensors[0][:7], val.tensors[1][:7])  # 7 rows: 4 on rank 0, 3 on rank 1
    callbacks = [
        AttributionMonitor(methods=("saliency", ("integrated_gradients", {"steps": 8}), "occlusion"), probe=probe),
        ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe=probe, action="log"),
        ProjectionMonitor(layers=["net.1.3"], probe=probe),
        SampleInfluenceMonitor(k=3, max_train_samples=64, probe=probe, every_n_epochs=1),
    ]
    path = str(tmp_path / f"{name}.json")
    trainer = tiny_trainer(tmp_path / name, callbacks=callbacks + [DumpMetrics(path)], max_epochs=1,
                           limit_train_batches=2, **kwargs)
    trainer.fit(DigitsModule(small_cnn(batchnorm=False), lr=0.0), DataLoader(train, batch_size=32), DataLoader(val, batch_size=50))
    with open(path, encoding="utf-8") as fh:
        return json.load(fh), trainer


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_stack_matches_one_process_and_logs_once(tmp_path):
    single, _ = _run(tmp_path, "single")
    ddp, trainer = _run(tmp_path, "ddp", devices=2, strategy="ddp_spawn")
    assert (single.pop("world_size"), ddp.pop("world_size")) == (1, 2)
    for key in ("xai/attribution/saliency/top5_share", "xai/attribution/integrated_gradients/completeness_gap",
                "xai/attribution/occlusion/top5_share", "xai/shortcut/corner/share", "xai/projection/net.1.3/separation"):
        assert key in single and key in ddp, key
        assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    acc = read_events(tmp_path / "ddp" / "tb" / "version_0")
    assert len(acc.Images("xai/attribution/saliency")) == 1  # logged once, by rank zero
    image = acc.Images("xai/attribution/saliency")[0]
    assert image.height == 7 * 66 + 2  # all 7 probe rows gathered


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_rank_without_probe_rows_does_not_deadlock(tmp_path):
    pl.seed_everything(0)
    train, val = digits_data(n_train=64, n_val=100)
    monitor = AttributionMonitor(methods=("saliency", ("integrated_gradients", {"steps": 4})),
                                 probe=(val.tensors[0][:1], val.tensors[1][:1]))  # rank 1 gets no rows
    path = str(tmp_path / "one.json")
    trainer = tiny_trainer(tmp_path, callbacks=[monitor, DumpMetrics(path)], max_epochs=1, limit_train_batches=1,
                           devices=2, strategy="ddp_spawn")
    trainer.fit(DigitsModule(small_cnn(batchnorm=False), lr=0.0), DataLoader(train, batch_size=32),
                DataLoader(val, batch_size=50))
    with open(path, encoding="utf-8") as fh:
        metrics = json.load(fh)
    assert "xai/attribution/saliency/top5_share" in metrics
    assert len(read_events(tmp_path / "tb" / "version_0").Images("xai/attribution/saliency")) == 1


def test_split_rows_covers_every_row_once():
    from lightning_xai.callbacks.base import split_rows

    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            kept = []
            for rank in range(world):
                start, stop, keep = split_rows(n, world, rank)
                assert 0 <= keep <= stop - start and (stop - start >= 1 or n == 0)
                kept.extend(range(start, start + keep))
            assert kept == list(range(n)), (n, world)
