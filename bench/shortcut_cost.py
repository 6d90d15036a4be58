"""What one ShortcutMonitor run costs, in known-region and in unknown-region mode, on the shortcut-digits demo's fit.

Each mode fits the demo's CNN (``examples/shortcut_digits.py``) for ``--epochs`` epochs with ShortcutMonitor explaining
every epoch (its defaults: 256 probe samples, 8 controls, 256 reference samples, ``donor_draws=4``), and reads
from the Trainer's cost book (:mod:`lightning_xai.callbacks.cost`) the seconds charged to its runs; printed per
mode: the median fit time and the median over the ``--repeats`` fits of the seconds per run, with the plain fit
(no callback) first. Known region: the demo's corner mark.
Unknown region: ``regions=None``, every candidate (hotspot, flat background, atypical corners, stamps, the presets
"corners" and "border") checked by intervention.

    python bench/shortcut_cost.py                 # 3 repeats x 4 epochs per mode, about 1 min on 2 cores
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import fit_with  # noqa: E402  (bench/overhead.py: the demo's fit, timed, with the cost book read)

from lightning_xai import ShortcutMonitor  # noqa: E402
from lightning_xai.datasets import region_mask, shortcut_digits  # noqa: E402


def fit(regions, epochs: int, data):
    """Seconds of the whole fit, the cost book's seconds per ShortcutMonitor run (None without a monitor), runs."""
    callbacks = [] if regions == "off" else [ShortcutMonitor(regions=regions, action="log")]
    seconds, spent = fit_with(callbacks, epochs, data)
    runs, charged = spent.get("ShortcutMonitor", (0, 0.0))
    return seconds, (charged / runs if runs else None), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("lightning_xai").setLevel(logging.WARNING)  # no cost table after every fit
    data = shortcut_digits("corner_intensity", "planted", "planted", noise=0.25)
    modes = {"no callback": "off", "known region (the mark)": {"mark": region_mask("corner_intensity")},
             "unknown region (regions=None)": None}
    fit("off", 1, data)  # warm-up
    print(f"\nShortcutMonitor every epoch on the shortcut-digits demo's fit, {args.epochs} epochs x {args.repeats} "
          f"repeats, {args.threads} threads\n")
    print("| mode | fit seconds (median) | seconds per run (median) | runs |")
    print("|---|---:|---:|---:|")
    for name, regions in modes.items():
        fits = [fit(regions, args.epochs, data) for _ in range(args.repeats)]
        per_run = [cost for _, cost, _ in fits if cost is not None]
        run_txt = f"{statistics.median(per_run):.3f}" if per_run else "–"
        print(f"| {name} | {statistics.median(s for s, _, _ in fits):.2f} | {run_txt} | {sum(r for _, _, r in fits)} |")


if __name__ == "__main__":
    main()
