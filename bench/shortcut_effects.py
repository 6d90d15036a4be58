"""Which per-sample effect should the shortcut alarm compare? The output shift against logit-scale alternatives.

The alarm (lightning_xai.shortcuts.alarm) compares, sample by sample, how much filling the region moves the model's
output against how much its change-matched controls do, and fires on a large, significant mean excess. The output
*shift* (total variation distance between the predicted distributions) is bounded and saturates on confident
predictions; a logit-scale effect does not. This script measures, on the known-region checks of
``bench/shortcuts.py`` (same data, models, probe sets and interventions), the paired z-score of the excess under
each effect:

* ``shift``: total variation distance (what the alarm uses);
* ``logit_max``: the largest change of a centred log-probability, ``max_c |delta(log p_c - mean_k log p_k)|``
  (probabilities floored at 1e-6);
* ``logit_l2``: the L2 norm of that change;
* ``flip``: whether the prediction changed.

Printed per effect: the largest z over the clean models' checks (a z >= 3 there would be a false alarm), and over
the shortcut models with the shortcut absent from validation, how many gap epochs (the first epoch whose accuracy gap
between the present and absent splits is >= 0.05) have z < 3 (a late alarm), with the smallest z at a gap epoch.

    python bench/shortcut_effects.py                   # seeds 0-5, about 4 min on 2 busy cores
    python bench/shortcut_effects.py --seeds 0 1 2 --probe 512
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shortcuts as bench  # noqa: E402  (bench/shortcuts.py: data, model, probe choice, known regions)

from lightning_xai.datasets import VARIANTS  # noqa: E402
from lightning_xai.shortcuts import intervene  # noqa: E402
from lightning_xai.shortcuts.alarm import paired_z  # noqa: E402

FLOOR = 1e-6
EFFECTS = ("shift", "logit_max", "logit_l2", "flip")


def effects(base: torch.Tensor, after: torch.Tensor) -> dict:
    """Per-sample effects ``(N, 1 + K)`` (region first, then the controls) from probabilities before ``(N, C)``
    and after ``(N, 1 + K, C)``."""
    delta = after - base.unsqueeze(1)
    log_before, log_after = (base + FLOOR).log(), (after + FLOOR).log()
    centred = (log_after - log_after.mean(2, keepdim=True)) - (log_before - log_before.mean(1, keepdim=True)).unsqueeze(1)
    return {"shift": 0.5 * delta.abs().sum(2), "logit_max": centred.abs().amax(2), "logit_l2": centred.norm(dim=2),
            "flip": (after.argmax(2) != base.argmax(1).unsqueeze(1)).double()}


def effect_z(effect: torch.Tensor) -> float:
    """The alarm's z (:func:`lightning_xai.shortcuts.alarm.paired_z`) of region minus mean control per sample."""
    return paired_z(effect[:, 0].double() - effect[:, 1:].double().mean(1))[1]


def run(variant: str, kind: str, seed: int, args) -> list:
    """Train as bench/shortcuts.py does; after every epoch the known-region check of both splits. Returns per epoch
    ``{"gap": present - absent accuracy, "absent": {effect: z}, "present": {...}}``."""
    out = []
    for model, acc, probes, _ in bench.train_epochs(variant, kind, seed, args):
        row = {"gap": acc["present"] - acc["absent"]}
        for mode, (x, y, mask) in probes.items():
            res = intervene(model, x, bench.known_masks(variant, mask), y, fill="swap", num_controls=8,
                            generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                base = model(x).double().softmax(1)
            after = base.unsqueeze(1) + torch.cat([res["delta"].unsqueeze(1), res["control_delta"]], 1).double()
            row[mode] = {name: effect_z(e) for name, e in effects(base, after.clamp(min=0)).items()}
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--probe", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    clean, gaps = {e: [] for e in EFFECTS}, {e: [] for e in EFFECTS}
    for variant in args.variants:
        for seed in args.seeds:
            for kind in ("shortcut", "clean"):
                rows = run(variant, kind, seed, args)
                if kind == "clean":
                    for epoch, row in enumerate(rows):
                        for mode in ("absent", "present"):
                            for e in EFFECTS:
                                clean[e].append((row[mode][e], f"{variant} seed {seed} {mode} epoch {epoch}"))
                    continue
                gap = next((epoch for epoch, row in enumerate(rows) if row["gap"] >= bench.GAP), None)
                if gap is not None:
                    for e in EFFECTS:
                        gaps[e].append((rows[gap]["absent"][e], f"{variant} seed {seed} epoch {gap}"))
        print(f"# {variant}: done after {time.time() - start:.0f} s", flush=True)
    print(f"\nseeds={args.seeds} probe={args.probe} epochs={args.epochs} (known region, swap fill, 8 change-matched controls)\n")
    print("| effect | clean checks with z >= 3 | largest clean z | gap epochs with z < 3 (absent split) | smallest z at a gap epoch |")
    print("|---|---|---|---|---|")
    for e in EFFECTS:
        worst = max(clean[e])
        low = min(gaps[e])
        print(f"| {e} | {sum(z >= 3 for z, _ in clean[e])}/{len(clean[e])} | {worst[0]:.1f} ({worst[1]}) | "
              f"{sum(z < 3 for z, _ in gaps[e])}/{len(gaps[e])} | {low[0]:.1f} ({low[1]}) |")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
