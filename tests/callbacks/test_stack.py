"""The whole callback stack together (examples/all_callbacks.py): it logs every area and does no harm."""
import os
import sys

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import ROOT, hook_count, read_events, tiny_trainer, trained_weights

sys.path.insert(0, os.path.join(ROOT, "examples"))
from all_callbacks import callbacks  # noqa: E402
from shortcut_digits import DigitsClassifier  # noqa: E402

from lightning_xai.datasets import shortcut_digits  # noqa: E402


def _fit(tmp_path, cbs):
    pl.seed_everything(0, workers=True)
    train, val = shortcut_digits("corner_intensity", "planted", "planted", noise=0.25)
    model = DigitsClassifier()
    trainer = tiny_trainer(tmp_path, callbacks=cbs, max_epochs=2, package="lightning.pytorch")  # the examples' module
    trainer.fit(model, DataLoader(TensorDataset(train.x[:384], train.y[:384]), batch_size=64, shuffle=True),
                DataLoader(TensorDataset(val.x[:256], val.y[:256]), batch_size=128))
    return trainer, model


def test_all_callbacks_log_and_leave_training_bit_identical(tmp_path):
    _, plain = _fit(tmp_path / "plain", [])
    trainer, explained = _fit(tmp_path / "stack", callbacks())
    a, b = trained_weights(plain), trained_weights(explained)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert hook_count(explained) == 0
    acc = read_events(trainer.logger.log_dir)
    tags = set(acc.Tags()["images"]) | set(acc.Tags()["scalars"])
    for area in ("attribution", "probe", "featvis", "shortcut", "samples", "projection"):
        assert any(t.startswith(f"xai/{area}/") for t in tags), area
    assert all(cb.errors == 0 for cb in trainer.callbacks if hasattr(cb, "errors"))
