"""W&B (offline mode, an optional extra): images and scalars reach a real WandbLogger next to TensorBoard."""
import glob
import os

import pytest

from helpers import DigitsModule, digits_loaders, read_events, tiny_trainer
from lightning_xai import AttributionMonitor

wandb = pytest.importorskip("wandb")


def test_images_reach_wandb_offline_and_tensorboard(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wb = WandbLogger(project="lightning-xai-test", save_dir=str(tmp_path), offline=True)
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=4)
    train, val = digits_loaders()
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], logger=[tb, wb], max_epochs=1)
    try:
        trainer.fit(DigitsModule(), train, val)
    finally:
        wandb.finish()
    assert "xai/attribution/saliency" in read_events(tb.log_dir).Tags()["images"]
    media = glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*",
                      "files", "media", "images", "xai", "attribution", "*"))
    assert media, os.listdir(os.path.join(str(tmp_path), "wandb"))
