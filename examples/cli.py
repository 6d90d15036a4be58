"""Configure lightning_xai callbacks from a LightningCLI YAML file.

    python examples/cli.py fit --config examples/config.yaml

The callbacks are listed under ``trainer.callbacks`` with ``class_path``/``init_args``, like any
Lightning callback; see examples/config.yaml.
"""
from __future__ import annotations

import os
import sys

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shortcut_digits import DigitsClassifier  # noqa: E402

from lightning_xai.datasets import shortcut_digits  # noqa: E402


class ShortcutDigitsData(pl.LightningDataModule):
    """Digits with a planted shortcut (see lightning_xai.datasets)."""

    def __init__(self, variant: str = "corner_intensity", train_shortcut: str = "planted", val_shortcut: str = "planted",
                 noise: float = 0.25, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train, self.val = shortcut_digits(hp.variant, hp.train_shortcut, hp.val_shortcut, noise=hp.noise, seed=hp.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train.x, self.train.y), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.val.x, self.val.y), batch_size=128)


def main() -> None:
    LightningCLI(DigitsClassifier, ShortcutDigitsData, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
