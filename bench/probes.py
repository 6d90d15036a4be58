"""Benchmark of LinearProbeMonitor: added share of a validation epoch, and memory of captured features.

Run: ``python bench/probes.py`` (add ``--quick`` for a smaller run). Absolute times on shared CPUs are
noisy, so the script prints ratios measured within one run: validation epochs with and without the
monitor are interleaved and the medians compared.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_xai.callbacks._probes import LinearProbeMonitor
from lightning_xai.probes import ActivationCapture
from lightning_xai.probes._epoch import EpochProbe, control_table


class Net(pl.LightningModule):
    """A small VGG-style CNN for 3x32x32 inputs with four ReLU layers to probe."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())


class TimedMonitor(LinearProbeMonitor):
    """LinearProbeMonitor that adds up the wall time spent in its own code: Lightning hooks and forward hooks."""

    spent = 0.0

    def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            TimedMonitor.spent += time.perf_counter() - start

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        for name, reducer in list(self._capture.reducers.items()):
            self._capture.reducers[name] = (lambda r: lambda t: self._timed(r, t))(reducer)

    def _start(self, trainer):
        return self._timed(super()._start, trainer)

    def _batch_start(self):
        return self._timed(super()._batch_start)

    def update(self, trainer, pl_module, batch, dataloader_idx):
        return self._timed(super().update, trainer, pl_module, batch, dataloader_idx)

    def _finish(self, trainer, pl_module):
        return self._timed(super()._finish, trainer, pl_module)


def overhead(samples: int, repeats: int, root: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    model = Net()
    layers = ["net.1", "net.3", "net.6", "net.8"]
    monitor = TimedMonitor(layers=layers)

    def run(callbacks, tag):
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(root, name=tag),
                             callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        start = time.perf_counter()
        trainer.validate(model, loader, verbose=False)
        return time.perf_counter() - start

    run([], "warmup")
    TimedMonitor.spent = 0.0
    first = run([monitor], "first")  # first probed epoch also fits the input baseline
    first_own = TimedMonitor.spent
    plain, probed, own = [], [], []
    for i in range(repeats):
        plain.append(run([], f"plain{i}"))
        TimedMonitor.spent = 0.0
        probed.append(run([monitor], f"probed{i}"))
        own.append(TimedMonitor.spent / (probed[-1] - TimedMonitor.spent))
    base, with_cb = statistics.median(plain), statistics.median(probed)
    print(f"\n## Overhead: {samples} validation samples, 4 probed layers (GAP: 32/64/128/128 dims), {repeats} repeats")
    print("| run | median s | added share, A/B (with - without) / without "
          "| added share, in-run (own time / rest of epoch) |")
    print("|---|---|---|---|")
    print(f"| validate, no monitor | {base:.2f} | - | - |")
    print(f"| validate + LinearProbeMonitor (steady state) | {with_cb:.2f} | {100 * (with_cb - base) / base:+.1f} % | "
          f"{100 * statistics.median(own):.1f} % |")
    print(f"| first probed epoch (also fits the input baseline) | {first:.2f} | {100 * (first - base) / base:+.1f} % | "
          f"{100 * first_own / (first - first_own):.1f} % |")
    print(f"(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


def memory(samples: int, side: int, channels: int) -> None:
    conv = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
    gen = torch.Generator().manual_seed(0)
    raw = samples * channels * side * side * 4
    print(
        f"\n## Memory: conv map {channels}x{side}x{side}, {samples} samples (raw float32 maps: {raw / 2**20:,.0f} MiB)")
    print("| reducer | feature dim | kept by the probe (features + ridge statistics) | share of raw maps "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|")
    for spec in ("gap", "gap+max", "pool2", ("rproj", 256)):
        probe = EpochProbe()
        with ActivationCapture(conv, ["1"], reduce=spec) as cap, torch.no_grad():
            for start in range(0, samples, 50):
                xb = torch.randn(min(50, samples - start), 3, side, side, generator=gen)
                yb = torch.randint(0, 10, (xb.shape[0],), generator=gen)
                conv(xb)
                feats = cap.pop(rows=xb.shape[0])["1"]
                probe.add(feats, {"label": yb}, torch.arange(start, start + xb.shape[0]))
        kept = probe.nbytes()
        index, labels = probe.labels()
        labels = labels["label"]
        table = torch.full((samples,), -1, dtype=torch.long)
        table[index] = labels
        probe.prepare({"label": 10}, {"label": control_table(table)})
        probe.predict()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {spec} | {feats.shape[1]} | {kept / 2**20:.2f} MiB | {100 * kept / raw:.3f} % | {rss:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--root", default="/tmp/lightning_xai_bench_probes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    overhead(samples=500 if args.quick else 2000, repeats=2 if args.quick else 5, root=args.root)
    memory(samples=200 if args.quick else 2000, side=64, channels=32)


if __name__ == "__main__":
    main()
