"""Overhead budget: the shortcut-digits demo's fit time with the default callback stack / without callbacks.

    python bench/overhead.py [--repeats 3] [--epochs 8] [--threads 2]

Stack (the issue's defaults): AttributionMonitor with saliency, SmoothGrad and IG on 32 probe samples,
LinearProbeMonitor on the conv and linear layers, ShortcutMonitor on the mark. Every configuration is
timed in the same process, interleaved round-robin, and the median is reported; the ratio to the plain
fit is the figure that matters (target: <= 1.10 for the whole stack).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import statistics
import sys
import time
import warnings

import torch
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from shortcut_digits import DigitsClassifier  # noqa: E402

from lightning_xai import AttributionMonitor, LinearProbeMonitor, ShortcutMonitor  # noqa: E402
from lightning_xai.datasets import region_mask, shortcut_digits  # noqa: E402


def stack(which: str) -> list:
    make = {
        "attribution": lambda: AttributionMonitor(methods=("saliency", "smoothgrad", "integrated_gradients"), probe_samples=32),
        "probes": lambda: LinearProbeMonitor(layers=["net.0.0", "net.0.2", "net.1.1", "net.1.3"]),
        "shortcut": lambda: ShortcutMonitor(regions={"mark": region_mask("corner_intensity")}, action="log"),
    }
    if which == "none":
        return []
    if which == "all":
        return [f() for f in make.values()]
    return [make[which]()]


def fit_seconds(which: str, epochs: int, data) -> float:
    train, val = data
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tempfile.mkdtemp(prefix="xai-overhead-"))  # images are encoded as in a real run
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=stack(which),
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    loaders = (DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True),
               DataLoader(TensorDataset(val.x, val.y), batch_size=128))
    start = time.perf_counter()
    trainer.fit(DigitsClassifier(), *loaders)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    data = shortcut_digits("corner_intensity", "planted", "planted", noise=0.25)
    configs = ["none", "attribution", "probes", "shortcut", "all"]
    times = {c: [] for c in configs}
    fit_seconds("none", 1, data)  # warm-up
    for _ in range(args.repeats):
        for c in configs:
            times[c].append(fit_seconds(c, args.epochs, data))
    base = statistics.median(times["none"])
    print(f"\n{args.epochs} epochs of the shortcut-digits demo, {args.threads} threads, median of {args.repeats}\n")
    print("| callbacks | fit seconds | / no callbacks | added share |")
    print("|---|---:|---:|---:|")
    for c in configs:
        med = statistics.median(times[c])
        print(f"| {c} | {med:.2f} | {med / base:.3f} | {100 * (med - base) / base:+.1f} % |")


if __name__ == "__main__":
    main()
