"""Overhead: a fit's time with the default callback stack / without callbacks, on a CIFAR-sized fit and on the demo.

    python bench/overhead.py [--rounds 3] [--rss-rounds 1] [--epochs 1] [--threads 2]   # the CIFAR-sized fit, #24
    python bench/overhead.py --case demo [--repeats 7] [--epochs 8] [--threads 2]

The default case is the realistic one: 50,000 training images of 3x32x32 made locally, a small CNN, batch 128, with and
without the default stack (AttributionMonitor, LinearProbeMonitor on two layers, ShortcutMonitor with one named region,
FeatureVisMonitor at its default cadence), paired and interleaved in one process; each callback's run against its floor
(declared passes x one pass of the model, timed in the same fit); peak resident memory in child processes. See
``bench/cifar.py``. What follows describes the demo case.

Stack (the issue's defaults): AttributionMonitor with saliency, SmoothGrad and IG on 32 probe samples,
LinearProbeMonitor on the conv and linear layers, ShortcutMonitor on the mark; every callback explains every
epoch (their default cadence). Every configuration is timed in the same process, interleaved (the order reversed
every other round); a configuration's ratio is the median over rounds of its fit time / the plain fit's time in
the same round (the machine's speed drifts between rounds), and the ratio to the plain fit is the figure that
matters. The cost book of the median whole-stack run (:mod:`lightning_xai.callbacks._cost`) says how many runs
each callback made and what they cost.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import statistics
import sys
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from shortcut_digits import DigitsClassifier  # noqa: E402

from lightning_xai import AttributionMonitor, LinearProbeMonitor, ShortcutMonitor  # noqa: E402
from lightning_xai.callbacks import _cost as cost  # noqa: E402
from lightning_xai.datasets import region_mask, shortcut_digits  # noqa: E402


def stack(which: str) -> list:
    make = {
        "attribution": lambda: AttributionMonitor(methods=("saliency", "smoothgrad", "integrated_gradients"),
                                                  probe_samples=32),
        "probes": lambda: LinearProbeMonitor(layers=["net.0.0", "net.0.2", "net.1.1", "net.1.3"]),
        "shortcut": lambda: ShortcutMonitor(regions={"mark": region_mask("corner_intensity")}, action="log"),
    }
    if which == "none":
        return []
    if which == "all":
        return [f() for f in make.values()]
    return [make[which]()]


def fit_seconds(which: str, epochs: int, data):
    return fit_with(stack(which), epochs, data)


def fit_with(callbacks: list, epochs: int, data):
    """Seconds of one fit of the demo's model with ``callbacks``, and per callback class name its runs and the seconds
    the cost book charged it."""
    train, val = data
    L.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tempfile.mkdtemp(prefix="xai-overhead-"))  # images are encoded as in a real run
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0)
    loaders = (DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True),
               DataLoader(TensorDataset(val.x, val.y), batch_size=128))
    start = time.perf_counter()
    trainer.fit(DigitsClassifier(), *loaders)
    seconds = time.perf_counter() - start
    book = cost.book(trainer)
    spent = {type(cb).__name__: (book.runs.get(id(cb), 0), book.seconds.get(id(cb), 0.0)) for cb in trainer.callbacks
             if id(cb) in book.names}
    return seconds, spent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=("cifar", "demo"), default="cifar")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fit (default: demo 8, cifar 1)")
    parser.add_argument("--threads", type=int, default=2)
    args, rest = parser.parse_known_args()
    if args.case == "cifar":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import cifar  # noqa: E402  (bench/cifar.py: its own options, e.g. --rounds, --rss-rounds)

        epochs = [] if args.epochs is None else ["--epochs", str(args.epochs)]
        cifar.main(rest + epochs + ["--threads", str(args.threads)])
        return
    args.epochs = 8 if args.epochs is None else args.epochs
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("lightning_xai").setLevel(logging.WARNING)  # no cost table after every fit
    data = shortcut_digits("corner_intensity", "planted", "planted", noise=0.25)
    configs = ["none", "attribution", "probes", "shortcut", "all"]
    runs = {c: [] for c in configs}
    fit_seconds("none", 1, data)  # warm-up
    for r in range(args.repeats):
        for c in configs if r % 2 == 0 else configs[::-1]:  # alternate the order: no config always runs first
            runs[c].append(fit_seconds(c, args.epochs, data))
    base = statistics.median(s for s, _ in runs["none"])
    print(f"\n{args.epochs} epochs of the shortcut-digits demo, {args.threads} threads, median of {args.repeats}\n")
    print("| callbacks | fit seconds (median) | / no callbacks (median of rounds) "
          "| explaining (cost book) / no callbacks | runs |")
    print("|---|---:|---:|---:|---:|")
    for c in configs:
        med = statistics.median(s for s, _ in runs[c])
        # each run against the plain fit of the same round: robust to the machine's speed drifting between rounds
        paired = statistics.median(s / plain for (s, _), (plain, _) in zip(runs[c], runs["none"]))
        charged = statistics.median(sum(secs for _, secs in spent.values()) / plain
                                    for (_, spent), (plain, _) in zip(runs[c], runs["none"]))
        count = statistics.median(sum(n for n, _ in spent.values()) for _, spent in runs[c])
        print(f"| {c} | {med:.2f} | {paired:.3f} | {charged:.3f} | {count:g} |")
    ordered = sorted(runs["all"], key=lambda r: r[0])
    seconds, spent = ordered[len(ordered) // 2]
    print(f"\nEach callback's share of the median 'all' run ({seconds:.2f} s; no callbacks: {base:.2f} s):\n")
    print("| callback | runs | seconds explaining | share of the fit |")
    print("|---|---:|---:|---:|")
    for name, (count, secs) in spent.items():
        print(f"| {name} | {count} | {secs:.3f} | {100 * secs / seconds:.1f} % |")


if __name__ == "__main__":
    main()
