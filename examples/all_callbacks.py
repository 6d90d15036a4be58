"""Every image callback of lightning_xai on one small digits CNN: a runnable reference for the README.

    python examples/all_callbacks.py            # 3 epochs, then: tensorboard --logdir runs/all_callbacks

(Text and tabular monitors need text/tabular models: see examples/text_spurious_token.py and the
README's TokenAttributionMonitor / TabularAttributionMonitor sections.)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shortcut_digits import DigitsClassifier  # noqa: E402

from lightning_xai import (  # noqa: E402
    AttributionMonitor,
    FeatureVisMonitor,
    LinearProbeMonitor,
    ProjectionMonitor,
    SampleInfluenceMonitor,
    ShortcutMonitor,
)
from lightning_xai.datasets import region_mask, shortcut_digits  # noqa: E402


def callbacks(every: int = 1) -> list:
    return [
        AttributionMonitor(methods=("saliency", ("integrated_gradients", {"steps": 16}), "occlusion",
                                    ("grad_cam", {"layer": "net.0.2"}), ("lime", {"samples": 64})),
                           probe_samples=10, every_n_epochs=every),
        LinearProbeMonitor(layers=["net.0.*", "net.1.*"], every_n_epochs=every),
        FeatureVisMonitor(targets=[("logits", range(10)), ("net.0.2", "channels", range(4))], steps=64,
                          every_n_epochs=max(every, 2), num_threads=1),
        ShortcutMonitor(regions={"mark": region_mask("corner_intensity")}, every_n_epochs=every),
        SampleInfluenceMonitor(k=4, max_train_samples=500, probe_samples=8, every_n_epochs=max(every, 2)),
        ProjectionMonitor(layers=["net.1.2"], probe_samples=64, every_n_epochs=every),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--logdir", default=os.path.join("runs", "all_callbacks"))
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    train, val = shortcut_digits("corner_intensity", "planted", "planted", noise=0.25)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=callbacks(),
                         logger=TensorBoardLogger(args.logdir), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(DigitsClassifier(), DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True),
                DataLoader(TensorDataset(val.x, val.y), batch_size=128))
    print(f"logged to {trainer.logger.log_dir}: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
