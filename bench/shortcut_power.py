"""How many probe samples, controls and donor draws does the shortcut alarm need? A power calculation on the benchmark.

The alarm's shift test (:mod:`lightning_xai.shortcuts.alarm`) is a paired z on ``d_n = shift_n - mean_k
control_shift_{n,k}`` over ``N`` probe samples, firing at ``mean d >= min_excess`` and ``z >= MIN_Z = 3``. With a true
mean excess ``delta`` and per-sample spread ``sigma_d`` the expected z is ``delta sqrt(N) / sigma_d``, so the test
fires with probability about ``Phi(delta sqrt(N) / sigma_d - 3)``: 95 % power needs ``delta sqrt(N) / sigma_d >= 4.64``.
``sigma_d`` falls with the controls ``K`` and donor draws ``D`` only down to the spread between samples ``tau``:

    sigma_d^2(K, D) = tau^2 + s_r^2 / D + s_c^2 / (K D)

(``s_r``: one draw's region-edit noise, ``s_c``: one control's). The same holds for the log-gain trigger (the
watermark's), with ``e_n = log_gain_n - mean_k control_log_gain_{n,k}``.

This script trains the benchmark's shortcut models (``bench/shortcuts.py``: 4 variants, the shortcut absent from
the validation split) and, at each seed's *gap epoch* (the first epoch the shortcut costs >= 0.05 accuracy on
shortcut-free data: when the alarm must have fired) and the epoch before it, runs the known-region intervention with
8 controls and ``D`` = 1, 2 and 4 donor draws on 256 probe samples. From them it fits ``tau^2``, ``s_r^2`` and
``s_c^2`` per check (``s_c^2`` from the spread among each sample's controls) and prints, per check, the effect, the z
at the defaults and the probe samples needed for 95 % power; then the smallest predicted z over the gap-epoch checks
for other (N, K, D) and their cost in forward passes per run.

    python bench/shortcut_power.py                       # 4 variants x seeds 0-2, about 3 min on 2 busy cores
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shortcuts as bench  # noqa: E402  (bench/shortcuts.py: data, model, probe choice, known regions)

from lightning_xai.datasets import VARIANTS  # noqa: E402
from lightning_xai.shortcuts import MIN_EXCESS, MIN_MATCH, MIN_Z, intervene  # noqa: E402

POWER_Z = 1.645  # one-sided 95 %: the expected z must reach MIN_Z + 1.645
DRAWS = (1, 2, 4)
CONTROLS = 8


def components(model, x, y, masks, refs) -> dict:
    """Per statistic (shift, log_gain): the mean excess and the variance components at 8 controls."""
    out = {}
    runs = {}
    for draws in DRAWS:
        runs[draws] = intervene(model, x, masks, y, fill="swap", num_controls=CONTROLS,
                                generator=torch.Generator().manual_seed(0), donors=(refs[0], refs[2], refs[1]),
                                donor_draws=draws, min_match=MIN_MATCH)
    for stat in ("shift", "log_gain"):
        var_d, within = {}, {}
        for draws, res in runs.items():
            region, controls = res[stat].double(), res[f"control_{stat}"].double()  # (N,), (N, K)
            d = region - controls.mean(1)
            var_d[draws] = float(d.var())
            within[draws] = float(controls.var(1).mean())  # one control's spread around the sample's controls, / D
        s_c2 = within[1]
        # var_d(D) - s_c^2 / (K D) = tau^2 + s_r^2 / D: least squares over D
        ds = torch.tensor([1.0 / dd for dd in DRAWS], dtype=torch.float64)
        v = torch.tensor([var_d[dd] - s_c2 / (CONTROLS * dd) for dd in DRAWS], dtype=torch.float64)
        a = torch.stack([torch.ones_like(ds), ds], 1)
        tau2, s_r2 = torch.linalg.lstsq(a, v.unsqueeze(1)).solution.squeeze(1).clamp(min=0).tolist()
        d4 = runs[4][stat].double() - runs[4][f"control_{stat}"].double().mean(1)
        out[stat] = {"delta": float(d4.mean()), "sd": float(d4.std()), "tau2": tau2, "s_r2": s_r2, "s_c2": s_c2}
    return out


def sigma(c: dict, k: int, draws: int) -> float:
    return math.sqrt(c["tau2"] + c["s_r2"] / draws + c["s_c2"] / (k * draws))


def expected_z(c: dict, n: int, k: int, draws: int) -> float:
    return c["delta"] * math.sqrt(n) / max(sigma(c, k, draws), 1.0 / math.sqrt(n))  # the alarm floors the SE at 1/N


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    args.probe, args.references = 256, 256
    torch.set_num_threads(1)
    start = time.time()
    checks = []  # (variant, seed, epoch, is_gap, components)
    for variant in args.variants:
        for seed in args.seeds:
            rows = []
            for epoch, (model, acc, probes, refs) in enumerate(bench.train_epochs(variant, "shortcut", seed, args)):
                x, y, mask = probes["absent"]
                rows.append((acc["present"] - acc["absent"], components(model, x, y, bench.known_masks(variant, mask), refs)))
            gap = next((e for e, (g, _) in enumerate(rows) if g >= bench.GAP), None)
            for e in ([gap - 1] if gap else []) + ([gap] if gap is not None else []):
                checks.append((variant, seed, e, e == gap, rows[e][1]))
        print(f"# {variant}: done after {time.time() - start:.0f} s", flush=True)

    target = MIN_Z + POWER_Z
    print(f"\nKnown region, shortcut absent from validation, {CONTROLS} controls; seeds {args.seeds}; gap epoch and the "
          f"one before. z at the defaults (N=256, K=8, D=4); N for 95 % power: (4.64 sigma_d / delta)^2.\n")
    print("| variant | seed | epoch | statistic | excess | sd of d (D=4) | tau | s_r | s_c | z (N=256) | N for 95 % power |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant, seed, epoch, is_gap, comp in checks:
        for stat, c in comp.items():
            need = (target * sigma(c, 8, 4) / c["delta"]) ** 2 if c["delta"] > 0 else float("inf")
            print(f"| {variant} | {seed} | {epoch}{' (gap)' if is_gap else ''} | {stat} | {c['delta']:+.3f} | {c['sd']:.3f} | "
                  f"{math.sqrt(c['tau2']):.3f} | {math.sqrt(c['s_r2']):.3f} | {math.sqrt(c['s_c2']):.3f} | "
                  f"{expected_z(c, 256, 8, 4):.1f} | {need:.0f} |")

    def fires(c, n, k, draws):  # the larger of the two triggers' predicted z, where the excess clears its floor
        zs = [expected_z(c[s], n, k, draws) for s in ("shift", "log_gain") if c[s]["delta"] >= MIN_EXCESS]
        return max(zs) if zs else float("-inf")

    gaps = [(v, s, c) for v, s, e, g, c in checks if g]
    print(f"\nPredicted z of the stronger trigger at each gap epoch ({len(gaps)} checks), per setting; power = "
          "Phi(z - 3); cost: sample forwards per run, N (1 + D (1 + K)).\n")
    print("| N | K | D | forwards per run | smallest z | checks with power < 95 % | checks with power < 50 % |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (64, 128, 256, 512):
        for k in (2, 4, 8):
            for draws in (1, 2, 4):
                zs = [fires(c, n, k, draws) for _, _, c in gaps]
                print(f"| {n} | {k} | {draws} | {n * (1 + draws * (1 + k))} | {min(zs):.1f} | "
                      f"{sum(z < target for z in zs)} | {sum(z < MIN_Z for z in zs)} |")
    print(f"\ntotal {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
