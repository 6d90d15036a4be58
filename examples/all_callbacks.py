"""Every image callback of lightning_xai on one small digits CNN: a runnable reference for the README.

    python examples/all_callbacks.py            # 3 epochs, then: tensorboard --logdir runs/all_callbacks

Each callback keeps its default cadence: FeatureVisMonitor and SampleInfluenceMonitor explain every 5th validation
epoch and the last one, the others every epoch. Fewer steps and samples than the defaults keep a run quick on a CPU
(under a minute; the cost table at the end of the fit says what each callback took). After the fit a table
shows one figure per callback and epoch, "-" where that callback did not explain that epoch. ``--every N`` sets
every callback's ``every_n_epochs``; ``--limit-batches N`` trains and validates on N batches per epoch (a smoke test).

(Text and tabular monitors need text/tabular models: see examples/text_spurious_token.py and the
README's TokenAttributionMonitor / TabularAttributionMonitor sections.)
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _figures import cell  # noqa: E402
from shortcut_digits import DigitsClassifier, History  # noqa: E402

from lightning_xai import (  # noqa: E402
    AttributionMonitor,
    FeatureVisMonitor,
    LinearProbeMonitor,
    ProjectionMonitor,
    SampleInfluenceMonitor,
    ShortcutMonitor,
)
from lightning_xai.datasets import region_mask, shortcut_digits  # noqa: E402


def callbacks(every: Optional[int] = None) -> list:
    """The six image callbacks; ``every``: their ``every_n_epochs`` (None: each callback's default)."""
    cadence = {} if every is None else {"every_n_epochs": every}
    return [
        AttributionMonitor(methods=("saliency", ("integrated_gradients", {"steps": 16}), "occlusion",
                                    ("grad_cam", {"layer": "net.0.2"}), ("lime", {"samples": 64})),
                           probe_samples=10, **cadence),
        LinearProbeMonitor(layers=["net.0.*", "net.1.*"], **cadence),
        FeatureVisMonitor(targets=[("logits", range(10)), ("net.0.2", "channels", range(4))], steps=64,
                          num_threads=1, **cadence),
        ShortcutMonitor(regions={"mark": region_mask("corner_intensity")}, **cadence),
        SampleInfluenceMonitor(k=4, max_train_samples=500, probe_samples=8, **cadence),
        ProjectionMonitor(layers=["net.1.2"], **cadence),
    ]


#: One figure per callback: (column title, tag, format).
COLUMNS = [
    ("val acc", "val_acc", ".3f"),
    ("IG top-5 share", "xai/attribution/integrated_gradients/top5_share", ".3f"),
    ("probe acc net.1.2", "xai/probe/net.1.2/accuracy", ".3f"),
    ("featvis logit act.", "xai/featvis/logits/activation", ".2f"),
    ("mark pull (nats)", "xai/shortcut/mark/pull", ".3f"),
    ("neighbour agreement", "xai/samples/neighbour_agreement", ".3f"),
    ("separation net.1.2", "xai/projection/net.1.2/separation", ".3f"),
]


def print_table(rows: list) -> None:
    """Each validation epoch's figures; "-": not computed at that epoch."""
    print(f"{'epoch':>5} " + " ".join(f"{title:>{len(title)}}" for title, _, _ in COLUMNS))
    for r in rows:
        print(f"{r['epoch']:>5} " + " ".join(cell(r, tag, len(title), spec) for title, tag, spec in COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every", type=int, default=None, help="every_n_epochs of every callback (default: theirs)")
    parser.add_argument("--limit-batches", type=int, default=None, help="train and validate on N batches per epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model: one is fastest)")
    parser.add_argument("--logdir", default=os.path.join("runs", "all_callbacks"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    train, val = shortcut_digits("corner_intensity", "planted", "planted", noise=0.25)
    history = History()
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1,
                        callbacks=callbacks(args.every) + [history], logger=TensorBoardLogger(args.logdir),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_train_batches=args.limit_batches,
                        limit_val_batches=args.limit_batches)
    trainer.fit(DigitsClassifier(), DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True),
                DataLoader(TensorDataset(val.x, val.y), batch_size=128))
    print()
    print_table(history.rows)
    print(f"\nlogged to {trainer.logger.log_dir}: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
