"""Does ShortcutMonitor's rule catch planted shortcuts, and stay quiet on clean models?

For each planted-digits variant (lightning_xai.datasets) and seed, a small CNN is trained twice with a
plain torch loop: on the planted split (a *shortcut model*) and on the same images whose mark carries a
random code (a *clean model*: the mark is there but useless). After every epoch the monitor's rule runs
on 256 stratified probe samples of two validation splits: shortcut *absent* (random code) and
*present* (planted, as PASCAL's watermark is in its test images), in two modes:

* known region: the variant's mark region (the top-left 2x2, the per-sample corner, the bottom-right
  3x3 tag box, the per-sample background) -> intervention -> alarm;
* unknown region: as ShortcutMonitor(regions=None) runs it: the Input x Gradient hotspot, the flat
  background (:func:`~lightning_xai.shortcuts.hotspots.flat_background`), each sample's atypical corner and
  the corner of a pasted stamp (:mod:`lightning_xai.shortcuts.corners`) and the presets "corners" and
  "border" are the candidates, each goes through the same intervention -> alarm (the gain only vetoes, except
  for the stamp).

The intervention swaps into each probe sample's region the content of the training (reference) samples whose
content there differs most, one from each of ``--donor-draws`` groups (8 change-matched controls); the alarm
compares the output shift (total variation distance) of region and controls, and the gain: how much the edit
raised the donor's training label, in probability (vetoes) and in log-probability (fires) (see
lightning_xai.shortcuts.alarm). Printed per variant and mode: detection rate on shortcut models,
false-alarm rate on clean models, the epoch of the first alarm per seed, and the *gap epoch* per seed:
the first epoch at which the shortcut model's accuracy on the present split is at least 0.05 above its
accuracy on the absent split (the same 539 validation images, same noise, only the mark's code differs;
a paired difference, so 0.05 is 27 images). That is the epoch a user holding a shortcut-free validation
split would see the shortcut cost accuracy; the target is an alarm no later than it. Also the largest
excess, z and gain z's over the clean models' checks (that the ``min_match`` guard lets through) and the shortcut
models' figures at the last epoch: this is how the thresholds were chosen.

Generator settings (NOISE, PLANT) are chosen so that each shortcut is actually learned within the 5
epochs; the clean models use the same settings.

    python bench/shortcuts.py              # 4 variants x 3 seeds, about 6 min on 2 busy cores
    python bench/shortcuts.py --seeds 1 --variants corner_intensity
    python bench/shortcuts.py --first-seed 6 --patience 2   # held-out seeds; an alarm after 2 firing epochs in a row
                                                            # (unknown mode: any candidate; the callback counts per candidate)
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from lightning_xai.attribution import input_x_gradient
from lightning_xai.datasets import VARIANTS, region_mask, shortcut_digits
from lightning_xai.shortcuts import (MIN_EXCESS, MIN_MATCH, MIN_Z, atypical_corners, find_hotspot, find_stamps, intervene,
                                     shortcut_alarm, stamp_donor_masks)
from lightning_xai.shortcuts.hotspots import flat_background
from lightning_xai.shortcuts.regions import SUSPECTS, preset_mask

GAP = 0.05
# Generator settings per variant, tuned so that each shortcut is learned within a few epochs: pixel noise makes
# the digits harder than the mark (at noise 0.3 the watermark was barely used: gap <= 0.05 in 2 of 3 seeds); the
# random-corner mark is 3x3; the tag is on every class-0 training image.
NOISE = {"corner_intensity": 0.15, "random_corner": 0.3, "watermark": 0.45, "background": 0.15}
PLANT = {"random_corner": {"mark": 3}, "watermark": {"watermark_share": 1.0}}


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def stratified(data, n: int, seed: int):
    """``n`` probe rows, round-robin over classes (as ProbeSetCallback chooses them)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data), generator=g)
    buckets = {c: [int(i) for i in perm if int(data.y[i]) == c] for c in range(10)}
    rows, depth = [], 0
    while len(rows) < n:
        rows += [b[depth] for b in buckets.values() if depth < len(b)]
        depth += 1
    idx = torch.tensor(rows[:n])
    return data.x[idx], data.y[idx], data.mask[idx]


def known_masks(variant: str, mask):
    """The region a user would name: the fixed mark box, or per sample the marked corner / the background pixels."""
    fixed = region_mask(variant, tuple(mask.shape[-2:]))
    return fixed.expand_as(mask).contiguous() if fixed is not None else mask


def check(model, x, y, masks, args, donors=None, gain_fires=True):
    """One intervention check; ``donors`` ``(inputs, masks, labels)``: the reference (training) samples that give the
    swapped-in content, as ShortcutMonitor's ``reference_samples`` (None: swap within the probe set, shift alone)."""
    out = intervene(model, x, masks, y, fill=args.fill, num_controls=args.controls,
                    generator=torch.Generator().manual_seed(0), donors=donors, donor_draws=getattr(args, "donor_draws", 1),
                    min_match=args.min_match)
    return shortcut_alarm(out["shift"], out["control_shift"], args.min_excess, args.min_z, out["change"], out["control_change"],
                          args.min_match, out.get("gain"), out.get("control_gain"), gain_fires=gain_fires,
                          log_gain=out.get("log_gain"), control_log_gain=out.get("control_log_gain"))


def with_masks(ref, masks):
    """The reference samples ``(inputs, labels)`` with their region masks, or None (no references, or no masks)."""
    if ref is None or masks is None or not bool(masks.any()):
        return None
    return ref[0], masks, ref[1]


def discover(model, x, y, args, ref=None):
    """Unknown-region mode, as ShortcutMonitor runs it: each candidate (the Input x Gradient hotspot, a flat
    background, each sample's atypical corner, a stamp's corner, the presets in ``args.presets``) goes through the
    same check. Returns the decision of a candidate
    that fires, else the one with the largest z among those the ``min_match`` guard lets through (None: no
    candidate)."""
    decisions = []
    d = 0 if ref is None else ref[0].shape[0]

    def fixed(mask, n):
        return mask.expand(n, -1, -1).contiguous()

    spot = find_hotspot(input_x_gradient(model, x, y), y, inputs=x)
    if spot.mask is not None:
        decisions.append(check(model, x, y, fixed(spot.mask, x.shape[0]), args, gain_fires=False,
                               donors=with_masks(ref, fixed(spot.mask, d))))
    flat = flat_background(x)
    if flat is not None:
        rows = flat.flatten(1).any(1)
        decisions.append(check(model, x[rows], y[rows], flat[rows], args, gain_fires=False,
                               donors=with_masks(ref, ref and flat_background(ref[0]))))
    decisions.append(check(model, x, y, atypical_corners(x), args, gain_fires=False,
                               donors=with_masks(ref, ref and atypical_corners(ref[0]))))
    stamps = find_stamps(x)
    if stamps is not None:  # as specific as a named region: the gain also fires
        decisions.append(check(model, x, y, stamps.masks, args, donors=with_masks(ref, ref and stamp_donor_masks(ref[0], stamps))))
    for name in args.presets:
        mask = preset_mask(name, tuple(x.shape[-2:]))
        decisions.append(check(model, x, y, fixed(mask, x.shape[0]), args, gain_fires=False,
                               donors=with_masks(ref, fixed(mask, d))))
    if not decisions:
        return None
    return max(decisions, key=lambda d: (d.fired, not d.match < args.min_match, d.z))


def splits(variant: str, kind: str, seed: int, probe: int, noise=None):
    """The training split (planted code for a shortcut model, random for a clean one), the validation splits without
    (``"absent"``, random code) and with (``"present"``) the shortcut, and their probe sets ``(x, y, mask)``."""
    train_code = "planted" if kind == "shortcut" else "random"
    noise = NOISE[variant] if noise is None else noise
    opts = PLANT.get(variant, {})
    train, val_out = shortcut_digits(variant, train_code, "random", noise=noise, seed=seed, **opts)
    _, val_in = shortcut_digits(variant, train_code, "planted", noise=noise, seed=seed, **opts)
    vals = {"absent": val_out, "present": val_in}
    return train, vals, {mode: stratified(data, probe, seed) for mode, data in vals.items()}


def references(variant: str, train, n: int, seed: int):
    """``n`` training samples, stratified, with their known-region masks: ``(inputs, labels, masks)``."""
    x, y, mask = stratified(train, n, seed + 100)
    return x, y, known_masks(variant, mask)


def train_epochs(variant: str, kind: str, seed: int, args):
    """Train the benchmark's CNN (Adam, plain torch loop); yields ``(model, accuracy per validation split, probe
    sets, reference samples)`` after every epoch, the model in eval mode (references: None with ``--references 0``)."""
    train, vals, probes = splits(variant, kind, seed, args.probe, getattr(args, "noise", None))
    refs = references(variant, train, args.references, seed) if getattr(args, "references", 0) > 0 else None
    torch.manual_seed(seed)
    model = cnn()
    opt = torch.optim.Adam(model.parameters(), lr=getattr(args, "lr", 3e-3))
    gen = torch.Generator().manual_seed(seed)
    batch = getattr(args, "batch", 64)
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch):
            b = perm[i:i + batch]
            loss = F.cross_entropy(model(train.x[b]), train.y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = {mode: float((model(d.x).argmax(1) == d.y).float().mean()) for mode, d in vals.items()}
        yield model, acc, probes, refs


def run(variant: str, kind: str, seed: int, args, record) -> None:
    for model, acc, probes, refs in train_epochs(variant, kind, seed, args):
        record["acc"][(variant, kind, seed)].append(acc)
        for mode, (x, y, mask) in probes.items():
            known = check(model, x, y, known_masks(variant, mask), args, None if refs is None else (refs[0], refs[2], refs[1]))
            unknown = discover(model, x, y, args, None if refs is None else refs[:2])
            record["known"][(variant, mode, kind, seed)].append(known)
            record["unknown"][(variant, mode, kind, seed)].append(unknown)


def first(flags, patience: int = 1):
    """The first epoch that ends ``patience`` firing epochs in a row (ShortcutMonitor's ``patience``), or None."""
    return next((e for e in range(patience - 1, len(flags)) if all(flags[e - patience + 1:e + 1])), None)


def fmt_epochs(values):
    return ",".join("-" if v is None else str(v) for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--noise", type=float, default=None, help="pixel noise (default: per variant, see NOISE)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--probe", type=int, default=256)
    parser.add_argument("--controls", type=int, default=8)
    parser.add_argument("--references", type=int, default=256,
                        help="training samples giving the swapped-in content (ShortcutMonitor's reference_samples); "
                             "0: swap within the probe set and decide on the shift alone (the rule before the gain)")
    parser.add_argument("--donor-draws", type=int, default=4,
                        help="reference samples swapped into each probe sample, figures averaged (ShortcutMonitor's donor_draws)")
    parser.add_argument("--fill", default="swap")
    parser.add_argument("--min-excess", type=float, default=MIN_EXCESS)
    parser.add_argument("--min-z", type=float, default=MIN_Z)
    parser.add_argument("--min-match", type=float, default=MIN_MATCH)
    parser.add_argument("--patience", type=int, default=1, help="firing epochs in a row before an alarm counts")
    parser.add_argument("--presets", nargs="*", default=list(SUSPECTS), help="presets also checked in unknown-region mode")
    parser.add_argument("--dump", default=None, help="write every check's figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # faster than 2 for a model this small, and kinder to a shared machine
    record = {"acc": defaultdict(list), "known": defaultdict(list), "unknown": defaultdict(list)}
    start = time.time()
    for variant in args.variants:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for kind in ("shortcut", "clean"):
                run(variant, kind, seed, args, record)
        print(f"# {variant}: done after {time.time() - start:.0f} s", flush=True)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"\nnoise={args.noise or NOISE} epochs={args.epochs} probe={args.probe} fill={args.fill} controls={args.controls} "
          f"min_excess={args.min_excess} min_z={args.min_z} min_match={args.min_match} patience={args.patience} "
          f"references={args.references} donor_draws={args.donor_draws} seeds={list(seeds)}\n")
    print("| variant | val split | mode | detected (shortcut) | false alarms (clean) | first alarm epoch per seed | "
          "gap epoch per seed | clean max excess / max z | clean max gain z / log gain z | "
          "shortcut last excess / z (g: gain z, l: log gain z) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        gaps = []
        for s in seeds:
            accs = record["acc"][(variant, "shortcut", s)]
            gaps.append(first([a["present"] - a["absent"] >= GAP for a in accs]))
        for mode in ("absent", "present"):
            for kind in ("known", "unknown"):
                rec = record[kind]
                det = [first([d is not None and d.fired for d in rec[(variant, mode, "shortcut", s)]], args.patience) for s in seeds]
                fa = [first([d is not None and d.fired for d in rec[(variant, mode, "clean", s)]], args.patience) is not None
                      for s in seeds]
                clean = [d for s in seeds for d in rec[(variant, mode, "clean", s)] if d is not None and not d.match < args.min_match]
                ctxt = "no candidate" if not clean else f"{max(d.excess for d in clean):+.3f} / {max(d.z for d in clean):.1f}"
                gains = [(d.gain_z, d.log_gain_z) for d in clean if d.gain_z == d.gain_z]
                gtxt = "–" if not gains else f"{max(g for g, _ in gains):.1f} / {max(lg for _, lg in gains):.1f}"
                last = [rec[(variant, mode, "shortcut", s)][-1] for s in seeds]
                last_txt = " ".join("none" if d is None else f"{d.excess:+.2f}/{d.z:.1f}"
                                    + ("" if d.gain_z != d.gain_z else f" g{d.gain_z:.1f} l{d.log_gain_z:.1f}")
                                    + ("*" if d.match < args.min_match else "")
                                    for d in last)
                print(f"| {variant} | {mode} | {kind} | {sum(d is not None for d in det)}/{len(det)} | "
                      f"{sum(fa)}/{len(fa)} | {fmt_epochs(det)} | {fmt_epochs(gaps)} | {ctxt} | {gtxt} | {last_txt} |")
    print("\n* the best control changed the input less than min_match times the region's edit: no verdict (no alarm)")
    print(f"\ntotal {time.time() - start:.0f} s")
    if args.dump:
        rows = [{"mode": kind, "key": list(key), "epoch": e, **(None if d is None else vars(d) or {})}
                for kind in ("known", "unknown") for key, ds in record[kind].items() for e, d in enumerate(ds) if d is not None]
        accs = [{"key": list(key), "accs": a} for key, a in record["acc"].items()]
        with open(args.dump, "w") as f:
            json.dump({"checks": rows, "accs": accs}, f)


if __name__ == "__main__":
    main()
