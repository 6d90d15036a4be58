"""The shortcut-digits demo: watch a model learn a planted shortcut, and catch it while it trains.

A small CNN learns scikit-learn's digits, but in the training split a 2x2 mark in the top-left corner
encodes the class by its brightness (the Decoy-MNIST shortcut). The validation split the model is
tuned on carries the mark too (the realistic case: PASCAL VOC's horse watermark is in its test images
as well), so validation accuracy looks fine. A held-out split without the shortcut (the mark's code is
random) shows the truth. The lightning_xai callbacks explain the model every epoch:

* AttributionMonitor: saliency, SmoothGrad and Integrated Gradients heatmaps of 20 probe digits;
* LinearProbeMonitor: how decodable the class and the mark's code are, layer by layer;
* ShortcutMonitor: attribution share on the mark, and the intervention (replace the mark, count the
  flipped predictions) that raises the alarm.

Every callback runs with its default cadence (every validation epoch); the table printed at the end shows each
epoch's figures, and the cost table before it what explaining took.

Run ``python examples/shortcut_digits.py`` (a few minutes on 2 CPU cores, most of it explaining), then
``tensorboard --logdir runs/shortcut_digits``. ``--clean`` trains without the shortcut for comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Dict, List

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _figures import cell, current_figures  # noqa: E402

from lightning_xai import AttributionMonitor, LinearProbeMonitor, ShortcutMonitor  # noqa: E402
from lightning_xai.datasets import region_mask, shortcut_digits  # noqa: E402


def make_cnn(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes)),
    )


class DigitsSteps:
    """The classifier's steps, mixed into a Lightning package's ``LightningModule`` (a Trainer takes only a module
    of its own package: examples/cli.py mixes them into either)."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = make_cnn()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y = batch
        name = "val_acc" if dataloader_idx == 0 else "heldout_clean_acc"
        self.log(name, (self(x).argmax(1) == y).float().mean(), add_dataloader_idx=False)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsClassifier(DigitsSteps, L.LightningModule):
    """A small CNN classifying 8x8 digits."""


class History(L.Callback):
    """Keeps each validation epoch's figures for the summary printed at the end: only those computed at that epoch
    (see examples/_figures.py), so a callback that did not explain an epoch shows "-" there."""

    def __init__(self) -> None:
        self.rows: List[Dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.rows.append(dict(current_figures(trainer), epoch=trainer.current_epoch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true", help="train without the planted shortcut")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--logdir", default=os.path.join("runs", "shortcut_digits"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    L.seed_everything(args.seed, verbose=False)

    mode = "none" if args.clean else "planted"
    noise = 0.25
    train, val = shortcut_digits("corner_intensity", train_shortcut=mode,
                                 val_shortcut=mode, noise=noise, seed=args.seed)
    _, heldout = shortcut_digits("corner_intensity", train_shortcut=mode,
                                 val_shortcut="random", noise=noise, seed=args.seed)
    # the mark's brightness code as a concept label for the probes (0 where there is no mark)
    train_loader = DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True)
    val_loaders = [DataLoader(TensorDataset(val.x, val.y), batch_size=128),
                   DataLoader(TensorDataset(heldout.x, heldout.y), batch_size=128)]

    mark = region_mask("corner_intensity")
    callbacks = [
        AttributionMonitor(methods=("saliency", "smoothgrad", "integrated_gradients"), probe_samples=20),
        LinearProbeMonitor(layers=["net.0.*", "net.1.*"], concepts={"mark": lambda batch: _mark_code(batch[0])}),
        ShortcutMonitor(regions={"mark": mark}, action="warn"),
    ]
    history = History()
    run = "clean" if args.clean else "shortcut"
    logger = TensorBoardLogger(args.logdir, name=run)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger,
                        callbacks=callbacks + [history], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=10)
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DigitsClassifier(), train_loader, val_loaders)
    alarms = [str(w.message) for w in caught if "ShortcutMonitor" in str(w.message)]
    summarize(history.rows, alarms, run, logger.log_dir, time.time() - start, args.clean)


def _mark_code(x: torch.Tensor) -> torch.Tensor:
    """The corner mark's brightness, quantised to the 10 planted codes (a per-sample concept label)."""
    level = x[:, 0, :2, :2].mean(dim=(1, 2))
    return ((1.0 - level) * 10).round().clamp(0, 9).long()


def summarize(rows, alarms, run, log_dir, seconds, clean) -> None:
    print(f"\n== lightning_xai shortcut-digits demo ({run} run, {seconds:.0f} s) ==")
    head = (f"{'epoch':>5} {'val acc':>8} {'held-out acc':>13} {'saliency on mark':>17} {'pull':>6} {'pull z':>7} "
            f"{'excess z':>9} {'alarm':>6}")
    print(head)
    for r in rows:  # "-": not computed at that epoch
        print(f"{r['epoch']:>5} {cell(r, 'val_acc', 8)} {cell(r, 'heldout_clean_acc', 13)} "
              f"{cell(r, 'xai/shortcut/mark/share_ratio', 17, '.2f', 'x')} "
              f"{cell(r, 'xai/shortcut/mark/pull', 6, '.2f')} {cell(r, 'xai/shortcut/mark/pull_z', 7, '.1f')} "
              f"{cell(r, 'xai/shortcut/mark/excess_z', 9, '.1f')} {cell(r, 'xai/shortcut/mark/alarm', 6, '.0f')}")
    print("\n'saliency on mark' is the share of saliency on the 2x2 mark divided by the mark's share of the image "
          "(1.0x = no preference);\n'pull' (nats) is how much pasting another class' mark raises that class' "
          "log-probability beyond a placebo paste,\n'pull z' its z, and 'excess z' the z of its excess over typical "
          "other places of the mark's shape\n(an alarm needs both tests, pooled or for one donor class; "
          "docs/shortcuts.md).")
    if alarms:
        print("\nShortcutMonitor raised the alarm:\n  " + alarms[0])
    else:
        print("\nShortcutMonitor raised no alarm." + ("" if clean else " (unexpected for the shortcut run)"))
    print(f"\nLook at: tensorboard --logdir {os.path.dirname(log_dir)}\n"
          "  IMAGES  xai/attribution/<method>: heatmaps of 20 probe digits per epoch (input | heatmap | overlay)\n"
          "  SCALARS xai/shortcut/mark/*: pull, excess, alarm, share on the mark; xai/probe/*: probe accuracies\n"
          "  TEXT    xai/attribution/probes: label, prediction and confidence of every row")


if __name__ == "__main__":
    main()
