"""Two gloo processes on CPU give the same probes as one process on the same validation data."""
import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from helpers import DigitsModule, digits_loaders, is_timing, tiny_trainer
from lightning_xai.callbacks._probes import LinearProbeMonitor


class DumpProbeMetrics(Callback):
    """Writes the probe metrics of the last validation epoch to a JSON file (global rank zero)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_validation_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("xai/probe/")}
            metrics["world_size"] = trainer.world_size
            metrics["local_val_samples"] = len(trainer.val_dataloaders.sampler)
            with open(self.path, "w", encoding="utf-8") as fh:
                json.dump(metrics, fh)


def _fails_on_rank_one(batch):
    """A concept that fails on the second process only (and nowhere in one process)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
        raise RuntimeError("this concept fails on rank 1")
    return (batch[1] % 2).long()


def _run(tmp_path, name, concepts=None, **trainer_kwargs):
    pl.seed_everything(0)
    train, val = digits_loaders(n_train=128, n_val=400, batch_size=50)  # 400 = 2 ranks x 4 batches x 50
    module = DigitsModule(lr=0.0)  # weights stay put, so both runs probe the same model
    path = str(tmp_path / f"{name}.json")
    monitor = LinearProbeMonitor(layers=["net.0.2", "net.0.4", "net.1.3"], reduce={"net.0.2": "pool2"},
                                 concepts=concepts)
    trainer = tiny_trainer(tmp_path / name, callbacks=[monitor, DumpProbeMetrics(path)], logger=False, max_epochs=1,
                           limit_train_batches=2, **trainer_kwargs)
    trainer.fit(module, train, val)
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_processes_equal_one_process(tmp_path):
    single = _run(tmp_path, "single")
    ddp = _run(tmp_path, "ddp", devices=2, strategy="ddp_spawn")
    assert (single.pop("world_size"), ddp.pop("world_size")) == (1, 2)
    assert (single.pop("local_val_samples"), ddp.pop("local_val_samples")) == (400, 200)  # each rank probes half
    assert single.keys() == ddp.keys()
    assert "xai/probe/net.0.4/accuracy" in single and "xai/probe/net.0.4/untrained_accuracy" in single
    for key in single:
        if is_timing(key):
            continue
        assert ddp[key] == pytest.approx(single[key], abs=1e-9), key
    assert single["xai/probe/net.1.3/accuracy"] > 0.3  # a real probe, not a degenerate one


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_a_concept_failing_on_one_rank_is_dropped_on_every_rank(tmp_path, capfd):
    # rank 1 drops the concept; rank 0 must drop it too, or their all-reduces would not match, and say why
    single = _run(tmp_path, "single")
    capfd.readouterr()
    ddp = _run(tmp_path, "ddp", concepts={"odd": _fails_on_rank_one}, devices=2, strategy="ddp_spawn")
    err = capfd.readouterr().err
    assert "the concept 'odd' failed at epoch 0 on rank 1" in err and "this concept fails on rank 1" in err
    assert not any("/odd/" in key for key in ddp)
    for key in single:
        if not is_timing(key) and key.startswith("xai/probe/"):
            assert ddp[key] == pytest.approx(single[key], abs=1e-9), key
