"""Configure lightning_xai callbacks from a LightningCLI YAML file.

    pip install -e ".[cli,demo]"   # LightningCLI, and scikit-learn for the digits
    python examples/cli.py fit --config examples/config.yaml

The callbacks are listed under ``trainer.callbacks`` with ``class_path``/``init_args``, like any
Lightning callback; see examples/config.yaml.

Lightning package: ``lightning.pytorch`` (``import lightning as L``, what ``.[cli]`` installs). With the
environment variable ``LIGHTNING_PACKAGE=pytorch_lightning`` the same config runs on ``pytorch_lightning``
(a LightningModule, DataModule and logger must come from the Trainer's package; the config names the logger
by its class name alone, which LightningCLI resolves in the package it runs). The model's steps come from
examples/shortcut_digits.py, which imports ``lightning``: both packages must be installed for that.
"""
from __future__ import annotations

import importlib
import os
import sys

from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shortcut_digits import DigitsSteps  # noqa: E402

from lightning_xai.datasets import shortcut_digits  # noqa: E402

PACKAGES = ("lightning.pytorch", "pytorch_lightning")
PACKAGE = os.environ.get("LIGHTNING_PACKAGE", "lightning.pytorch")
if PACKAGE not in PACKAGES:
    raise SystemExit(f"Expected `LIGHTNING_PACKAGE` to be one of {PACKAGES}, but got {PACKAGE!r}.")
pl = importlib.import_module(PACKAGE)
LightningCLI = importlib.import_module(f"{PACKAGE}.cli").LightningCLI


class DigitsClassifier(DigitsSteps, pl.LightningModule):
    """examples/shortcut_digits.py's CNN on the chosen package's LightningModule."""


class ShortcutDigitsData(pl.LightningDataModule):
    """Digits with a planted shortcut (see lightning_xai.datasets)."""

    def __init__(self, variant: str = "corner_intensity", train_shortcut: str = "planted",
                 val_shortcut: str = "planted", noise: float = 0.25, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train, self.val = shortcut_digits(hp.variant, hp.train_shortcut,
                                               hp.val_shortcut, noise=hp.noise, seed=hp.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train.x, self.train.y), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.val.x, self.val.y), batch_size=128)


def main() -> None:
    LightningCLI(DigitsClassifier, ShortcutDigitsData, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
