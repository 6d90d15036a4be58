"""Under DDP the overhead budget is decided by rank zero for every rank, so no rank waits alone in a gather."""
import json
from datetime import timedelta

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader

from helpers import DigitsModule, digits_data, small_cnn, tiny_trainer
from lightning_xai import AttributionMonitor
from lightning_xai.callbacks import budget


class ExhaustBudgetOnRankOne(Callback):
    """Makes rank 1's own ledger say "over budget" before every validation epoch; rank 0's says "go"."""

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            budget.ledger(trainer).spent = 1e9


class DumpLedger(Callback):
    def __init__(self, folder, monitor):
        self.folder, self.monitor = folder, monitor

    def on_fit_end(self, trainer, pl_module):
        book = budget.ledger(trainer)
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w", encoding="utf-8") as fh:
            json.dump({"runs": book.runs.get(id(self.monitor), []), "skipped": book.skipped.get(id(self.monitor), []),
                       "explained": self.monitor.last_explained_epoch}, fh)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_rank_zero_decides_the_budget_for_every_rank(tmp_path):
    pl.seed_everything(0)
    train, val = digits_data(n_train=64, n_val=40)
    monitor = AttributionMonitor(methods="saliency", probe=(val.tensors[0][:6], val.tensors[1][:6]), max_overhead=1e6)
    strategy = DDPStrategy(process_group_backend="gloo", start_method="spawn", timeout=timedelta(seconds=60))
    trainer = tiny_trainer(tmp_path, callbacks=[ExhaustBudgetOnRankOne(), monitor, DumpLedger(str(tmp_path), monitor)],
                           max_epochs=2, limit_train_batches=1, devices=2, strategy=strategy, logger=False)
    trainer.fit(DigitsModule(small_cnn(batchnorm=False), lr=0.0), DataLoader(train, batch_size=32),
                DataLoader(val, batch_size=20))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # rank 1 alone would have skipped both epochs (and left rank 0 waiting in the gather): it followed rank 0
    assert ranks[0] == ranks[1] == {"runs": [0, 1], "skipped": [], "explained": 1}
