"""Shortcut families: does a shortcut detector generalise to shortcuts it was not tuned on? (#20 item 3)

Sixteen shortcut *families* combine a form (dot, glyph, line, frame, texture, background colour or
intensity, global intensity or colour shift), a position (fixed, random corner, anywhere), a size, a
contrast, an overlap with the object (off, on), a scope (a code per class, or a watermark on some
classes only) and whether the shortcut is present in or absent from the validation (probe) data. Each
family is trained on two datasets (digits: ``load_digits`` upsampled to 16x16 on a 24x24 canvas, 10
classes; shapes: six shapes in random colour, size and place on 32x32 patches of
``load_sample_images``, 3 channels) with two architectures (a plain CNN; a BatchNorm residual net with
global average pooling): 4 runs per family, one seed each. Clean runs (no shortcut, or a family's mark
with a random, useless code) count false alarms. The families are split into DESIGN and HELD-OUT in
``bench/shortcut_split.json`` (drawn by ``split`` with a written-down seed, committed before any detector
ran); see ``docs/shortcut_benchmark.md``.

Ground truth is measured during training on a held-out TEST split (never the probe/validation split), after
every epoch: reliance = accuracy with the shortcut as in training - accuracy with the shortcut randomised
(the code of a uniformly random class; removed for a watermark), on the test images that carry it, and the
flip rate (share of other classes' images that become class c when c's shortcut is pasted in). A run
*relies* at an epoch when reliance >= 0.05 and an exact one-sided McNemar test on the paired correct/wrong
outcomes gives p <= 0.01; the first such epoch is the detection deadline.

    python bench/shortcut_families.py split                  # draws the split (done once, committed)
    python bench/shortcut_families.py train --split all      # trains and caches every run (resumable)
    python bench/shortcut_families.py truth                  # ground-truth table from the cache
    python bench/shortcut_families.py evaluate --split held_out --mode named
    python bench/shortcut_families.py evaluate --split clean --mode discovery

Epochs are 0-based as in Lightning: ``epoch0.pt`` is the state after the first pass over the training data.
The cache lives in ``/tmp/scf_cache`` (``--cache`` or ``$SCF_CACHE``): per run ``meta.json``, ``data.pt``
(probe, donor and their shortcut/object masks), ``epoch<k>.pt`` and ``truth.json`` (written last).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SPLIT_FILE = Path(__file__).with_name("shortcut_split.json")
DEFAULT_CACHE = os.environ.get("SCF_CACHE", "/tmp/scf_cache")
EPOCHS = 6
BATCH = 32
LR = 3e-3
AGREE = 0.95          # share of training images whose code is their own class's (the rest: a random class)
MARK_P = 0.9          # share of a watermarked class's images that carry its mark
N_PROBE, N_DONOR = 128, 256
MIN_RELIANCE, MAX_P = 0.05, 0.01
DATASETS = ("digits", "shapes")
ARCHS = ("plain", "resnet")
COMBOS = [(d, a) for d in DATASETS for a in ARCHS]

# --------------------------------------------------------------------------------------------- families
# size: box side in px per dataset (digits 24x24, shapes 32x32); contrast: blend weight of the mark.
SIZES = {"digits": {"small": 4, "large": 6}, "shapes": {"small": 5, "large": 8}}
CONTRAST = {"high": 1.0, "low": 0.45}


def _fam(name, form, position, size, contrast, overlap, scope, val):
    return dict(name=name, form=form, position=position, size=size, contrast=contrast, overlap=overlap,
                scope=scope, val=val, region_less=form == "global")


FAMILIES = [
    _fam("F01", "dot", "fixed", "small", "high", "off", "code", "present"),
    _fam("F02", "dot", "corner", "large", "low", "off", "code", "present"),
    _fam("F03", "dot", "anywhere", "small", "high", "on", "code", "present"),
    _fam("F04", "glyph", "anywhere", "small", "high", "off", "code", "present"),
    _fam("F05", "glyph", "corner", "small", "high", "off", "watermark", "present"),
    _fam("F06", "glyph", "anywhere", "large", "low", "on", "watermark", "present"),
    _fam("F07", "line", "fixed", "large", "high", "off", "code", "absent"),
    _fam("F08", "line", "anywhere", "small", "low", "on", "code", "present"),
    _fam("F09", "frame", "fixed", "small", "high", "off", "code", "present"),
    _fam("F10", "frame", "fixed", "large", "low", "off", "watermark", "absent"),
    _fam("F11", "texture", "fixed", "large", "low", "off", "code", "present"),
    _fam("F12", "texture", "background", "-", "low", "off", "code", "absent"),
    _fam("F13", "background", "background", "-", "high", "off", "code", "present"),
    _fam("F14", "background", "background", "-", "low", "off", "watermark", "absent"),
    _fam("F15", "global", "everywhere", "-", "low", "on", "code", "present"),
    _fam("F16", "global", "everywhere", "-", "high", "on", "watermark", "absent"),
]
FAMILY = {f["name"]: f for f in FAMILIES}
REGIONED = [f["name"] for f in FAMILIES if not f["region_less"]]
SPLIT_SEED = 20261204
N_CLEAN_DESIGN, N_CLEAN_HELD_OUT = 6, 26      # per dataset x architecture
FRESH_CLEAN_FIRST = 200  # clean_fresh: seeds 200..225, added (2026-12-04) after the clean split's results were read
FRESH2_CLEAN_FIRST = 300  # clean_fresh2: seeds 300..325, added (2026-12-04) after clean_fresh's results were read
FRESH3_CLEAN_FIRST = 400  # clean_fresh3: seeds 400..425, added (2026-12-04) after clean_fresh2's results were read
CLEAN_SPLITS = ("clean_design", "clean", "clean_fresh", "clean_fresh2", "clean_fresh3")


def _split_ok(half):
    fams = [FAMILY[n] for n in half]
    forms = {f["form"] for f in fams}
    return ({"fixed", "corner", "anywhere"} <= {f["position"] for f in fams}
            and {"code", "watermark"} <= {f["scope"] for f in fams}
            and {"present", "absent"} <= {f["val"] for f in fams}
            and {"high", "low"} <= {f["contrast"] for f in fams}
            and {"on", "off"} <= {f["overlap"] for f in fams}
            and {"small", "large"} <= {f["size"] for f in fams}
            and sum(f["region_less"] for f in fams) == 1
            and len(forms) >= 5)


def draw_split(seed=SPLIT_SEED):
    """Permute the families with ``seed`` until both halves (8 + 8) cover every position, scope, validation
    presence, contrast, overlap and size, hold one region-less family each and at least 5 forms."""
    rng = np.random.default_rng(seed)
    names = [f["name"] for f in FAMILIES]
    for draw in range(1, 10_001):
        perm = list(rng.permutation(names))
        design, held = sorted(map(str, perm[:8])), sorted(map(str, perm[8:]))
        if _split_ok(design) and _split_ok(held):
            return dict(seed=seed, draws=draw, design=design, held_out=held)
    raise RuntimeError("no split satisfied the constraints")


def load_split():
    return json.loads(SPLIT_FILE.read_text())


def runs_of(split_name, split=None):
    """Run specs (dicts) of a split: 'design', 'held_out', 'clean' (held-out clean), 'clean_design', 'clean_fresh'
    to 'clean_fresh3' (further held-out clean sets, each added before the detector it measures ran on it), 'all'."""
    split = split or load_split()
    if split_name == "all":
        return [r for s in ("design", "held_out") + CLEAN_SPLITS for r in runs_of(s, split)]
    runs = []
    if split_name in ("design", "held_out"):
        for fam in split[split_name]:
            for d, a in COMBOS:
                runs.append(dict(kind="shortcut", family=fam, dataset=d, arch=a, seed=0, split=split_name,
                                 id=f"{fam}-{d}-{a}-s0"))
        return runs
    if split_name in CLEAN_SPLITS:
        first, n = {"clean": (100, N_CLEAN_HELD_OUT), "clean_design": (0, N_CLEAN_DESIGN),
                    "clean_fresh": (FRESH_CLEAN_FIRST, N_CLEAN_HELD_OUT),
                    "clean_fresh2": (FRESH2_CLEAN_FIRST, N_CLEAN_HELD_OUT),
                    "clean_fresh3": (FRESH3_CLEAN_FIRST, N_CLEAN_HELD_OUT)}[split_name]
        for d, a in COMBOS:
            for seed in range(first, first + n):
                # even seeds: no shortcut; odd seeds: a region-ful family's mark with a random (useless) code
                if seed % 2 == 0:
                    runs.append(dict(kind="clean", family=None, dataset=d, arch=a, seed=seed, split=split_name,
                                     id=f"clean-none-{d}-{a}-s{seed}"))
                else:
                    fam = REGIONED[(seed // 2) % len(REGIONED)]
                    runs.append(dict(kind="useless", family=fam, dataset=d, arch=a, seed=seed, split=split_name,
                                     id=f"clean-{fam}-{d}-{a}-s{seed}"))
        return runs
    raise ValueError(f"Expected split to be one of design, held_out, {', '.join(CLEAN_SPLITS)}, all, but got "
                     f"{split_name!r}")


# ------------------------------------------------------------------------------------------- base images
_BASE_CACHE: dict = {}


def _digits_base(seed):
    """Digits at 16x16 (bilinear x2) on a 24x24 canvas at a random offset in [1, 7]; object = value > 0.3.
    A fixed split of the 1797 digits: 900 train (each placed twice: 1800 training images), 297 validation,
    600 test."""
    from sklearn.datasets import load_digits
    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0          # (1797, 1, 8, 8)
    up = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)   # (1797, 1, 16, 16)
    n = len(img)
    up, y = torch.cat([up, up]), torch.tensor(d.target, dtype=torch.long).repeat(2)   # copy j of i at i + j * n
    rng = np.random.default_rng(1000 + seed)
    order = np.random.default_rng(7).permutation(n)
    x = torch.zeros(2 * n, 1, 24, 24)
    for i in range(2 * n):
        oy, ox = rng.integers(1, 8, size=2)
        x[i, :, oy:oy + 16, ox:ox + 16] = up[i]
    obj = x[:, 0] > 0.3
    parts = {"train": np.concatenate([order[:900], order[:900] + n]), "val": order[900:1197], "test": order[1197:]}
    return x, obj, y, parts, 10, 0.15


def _sample_photos():
    if "photos" not in _BASE_CACHE:
        from sklearn.datasets import load_sample_images
        _BASE_CACHE["photos"] = [torch.tensor(im, dtype=torch.float32).permute(2, 0, 1) / 255.0
                                 for im in load_sample_images().images]
    return _BASE_CACHE["photos"]


SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def _shape_mask(k, cy, cx, r, size=32):
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    dy, dx = yy - cy, xx - cx
    dist = torch.sqrt(dy ** 2 + dx ** 2)
    if SHAPES[k] == "circle":
        return dist <= r
    if SHAPES[k] == "square":
        return (dy.abs() <= 0.8 * r) & (dx.abs() <= 0.8 * r)
    if SHAPES[k] == "triangle":
        return (dy <= 0.8 * r) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    if SHAPES[k] == "cross":
        return ((dy.abs() <= r / 3) & (dx.abs() <= r)) | ((dx.abs() <= r / 3) & (dy.abs() <= r))
    if SHAPES[k] == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    return dy.abs() + dx.abs() <= r                                                   # diamond


def _shapes_base(seed):
    """Six shapes (one class each), random colour, centre and radius 7-12 px, on random 24-64 px crops of
    the two sample photos resized to 32x32. 1500 train, 400 validation, 800 test."""
    photos = _sample_photos()
    rng = np.random.default_rng(2000 + seed)
    n = 2700
    y = torch.tensor(np.arange(n) % 6, dtype=torch.long)[torch.as_tensor(rng.permutation(n))]
    x = torch.zeros(n, 3, 32, 32)
    obj = torch.zeros(n, 32, 32, dtype=torch.bool)
    for i in range(n):
        ph = photos[rng.integers(2)]
        s = int(rng.integers(24, 65))
        top, left = rng.integers(0, ph.shape[1] - s), rng.integers(0, ph.shape[2] - s)
        bg = F.interpolate(ph[None, :, top:top + s, left:left + s], size=(32, 32), mode="area")[0]
        r = float(rng.uniform(7, 12))
        cy, cx = rng.uniform(r + 1, 31 - r, size=2)
        m = _shape_mask(int(y[i]), float(cy), float(cx), r)
        colour = torch.tensor(rng.uniform(0, 1, size=3), dtype=torch.float32)
        x[i] = torch.where(m, colour[:, None, None], bg)
        obj[i] = m
    parts = {"train": np.arange(0, 1500), "val": np.arange(1500, 1900), "test": np.arange(1900, 2700)}
    return x, obj, y, parts, 6, 0.05


def base_data(dataset, seed):
    key = (dataset, seed)
    if key not in _BASE_CACHE:
        _BASE_CACHE.clear() if len(_BASE_CACHE) > 8 else None
        _BASE_CACHE[key] = (_digits_base if dataset == "digits" else _shapes_base)(seed)
    return _BASE_CACHE[key]


# ------------------------------------------------------------------------------------------ the marks
def _hues(k):
    """k saturated colours evenly spaced in hue, (k, 3)."""
    h = np.arange(k) / k
    out = []
    for v in h:
        i, f = int(v * 6), v * 6 - int(v * 6)
        q, t = 1 - f, f
        out.append([(1, t, 0), (q, 1, 0), (0, 1, t), (0, q, 1), (t, 0, 1), (1, 0, q)][i % 6])
    return torch.tensor(out, dtype=torch.float32)


class Marker:
    """Draws one family's mark on images. A mark's *value* is a class index (whose code it carries) or -1
    (no mark). Positions are drawn once per image (``place``) so that the same image can be rendered with
    its own code, a random code, no mark, or another class's code, all at the same place."""

    def __init__(self, family, dataset, n_classes, channels, side, seed):
        self.f, self.k, self.c, self.side = FAMILY[family], n_classes, channels, side
        self.s = SIZES[dataset].get(self.f["size"], 0)
        self.alpha = CONTRAST[self.f["contrast"]]
        g = torch.Generator().manual_seed(10_000 + seed)
        form = self.f["form"]
        # per-class codes
        if channels == 1:
            self.colours = torch.linspace(0.25, 1.0, n_classes)[:, None]               # (K, 1) grey levels
            if form == "background":
                self.colours = torch.linspace(0.05, 0.6, n_classes)[:, None]
        else:
            self.colours = _hues(n_classes)                                           # (K, 3)
        perm = torch.randperm(n_classes, generator=g)
        self.colours = self.colours[perm]
        if form == "glyph":
            self.glyphs = self._distinct_bits(n_classes, self.s * self.s, g).view(n_classes, self.s, self.s)
        if form == "line":
            self.length = 3 * self.s
            self.thick = 2 if self.f["size"] == "small" else 3
            self.bits = self._distinct_bits(n_classes, self.length, g)
        if form == "texture":
            if self.f["position"] == "background":
                self.theta = (torch.arange(n_classes) * math.pi / n_classes)[perm]
            else:
                self.patterns = torch.tanh(torch.randn(n_classes, channels, self.s, self.s, generator=g)) * 0.5 + 0.5
        if form == "global":
            amp = 0.15 if self.f["contrast"] == "low" else 0.35
            if channels == 1:
                self.shift = torch.linspace(-amp, amp, n_classes)[perm][:, None]
            else:
                self.shift = (self.colours - 0.5) * 2 * amp
        if self.f["scope"] == "watermark":
            self.marked = sorted(torch.randperm(n_classes, generator=g)[:2].tolist())
        else:
            self.marked = list(range(n_classes))

    @staticmethod
    def _distinct_bits(k, n, g):
        while True:
            b = torch.rand(k, n, generator=g) < 0.5
            dist = (b[:, None] != b[None]).float().mean(-1) + torch.eye(k)         # (K, K) Hamming share
            if dist.min() >= 0.3 and (b.float().mean(1) >= 0.25).all() and (b.float().mean(1) <= 0.75).all():
                return b.float()

    # placement ---------------------------------------------------------------------------------------
    def place(self, obj, rng):
        """Per-image placement: (N, 2) top-left corners (or zeros for area forms)."""
        n, side, s = len(obj), self.side, self.s
        pos = self.f["position"]
        h, w = (self.thick, self.length) if self.f["form"] == "line" else (s, s)
        out = np.zeros((n, 2), dtype=np.int64)
        if pos == "fixed":
            if self.f["form"] == "dot":
                out[:] = (0, 0)
            elif self.f["form"] == "line":
                out[:] = (side - h, (side - w) // 2)
            elif self.f["form"] == "texture":
                out[:] = (side - h, side - w)
        elif pos == "corner":
            corners = np.array([(0, 0), (0, side - w), (side - h, 0), (side - h, side - w)])
            out[:] = corners[rng.integers(0, 4, size=n)]
        elif pos == "anywhere" and self.f["overlap"] == "on":
            for i in range(n):
                ys, xs = torch.nonzero(obj[i], as_tuple=True)
                j = rng.integers(len(ys)) if len(ys) else None
                cy, cx = (int(ys[j]), int(xs[j])) if j is not None else (side // 2, side // 2)
                out[i] = (min(max(cy - h // 2, 0), side - h), min(max(cx - w // 2, 0), side - w))
        elif pos == "anywhere":
            occ = F.max_pool2d(obj[:, None].float(), kernel_size=(h, w), stride=1)[:, 0]   # (N, side-h+1, side-w+1)
            for i in range(n):
                free = torch.nonzero(occ[i] == 0)
                if len(free) == 0:
                    free = torch.nonzero(occ[i] <= occ[i].min())
                out[i] = free[rng.integers(len(free))].numpy()
        return out

    def region(self, obj, where):
        """Pixels a mark at ``where`` would cover, (N, H, W) bool (area forms: background / everything)."""
        n, side = len(obj), self.side
        form = self.f["form"]
        m = torch.zeros(n, side, side, dtype=torch.bool)
        if form == "frame":
            w = 1 if self.f["size"] == "small" else 2
            m[:, :w], m[:, -w:], m[:, :, :w], m[:, :, -w:] = True, True, True, True
            return m
        if form == "background" or (form == "texture" and self.f["position"] == "background"):
            return ~obj
        if form == "global":
            return torch.ones(n, side, side, dtype=torch.bool)
        h, w = (self.thick, self.length) if form == "line" else (self.s, self.s)
        for i in range(n):
            t, lf = where[i]
            m[i, t:t + h, lf:lf + w] = True
        return m

    # drawing -----------------------------------------------------------------------------------------
    def draw(self, x, obj, where, values):
        """x: (N, C, H, W) clean images; values: (N,) class whose code to draw, -1 for none. Returns a copy."""
        x = x.clone()
        form, a = self.f["form"], self.alpha
        region = self.region(obj, where)
        for i in np.nonzero(values >= 0)[0]:
            v = int(values[i])
            m = region[i]
            if form in ("dot", "frame", "background"):
                x[i] = torch.where(m, (1 - a) * x[i] + a * self.colours[v][:, None, None], x[i])
            elif form == "glyph" or form == "line":
                t, lf = where[i]
                if form == "glyph":
                    patch = self.glyphs[v].expand(self.c, -1, -1)
                else:                               # a barcode: on bits in the class's colour, off bits in its inverse
                    bits = self.bits[v][None, None, :]
                    col = self.colours[v][:, None, None]
                    patch = (bits * col + (1 - bits) * (1 - col)).expand(self.c, self.thick, -1)
                h, w = patch.shape[-2:]
                x[i, :, t:t + h, lf:lf + w] = (1 - a) * x[i, :, t:t + h, lf:lf + w] + a * patch
            elif form == "texture" and self.f["position"] == "background":
                yy, xx = torch.meshgrid(torch.arange(self.side), torch.arange(self.side), indexing="ij")
                th = float(self.theta[v])
                grating = torch.sin(2 * math.pi * (xx * math.cos(th) + yy * math.sin(th)) / 4.0)
                x[i] = torch.where(m, x[i] + 0.5 * a * grating, x[i])
            elif form == "texture":
                t, lf = where[i]
                box = (slice(None), slice(t, t + self.s), slice(lf, lf + self.s))
                x[i][box] = (1 - a) * x[i][box] + a * self.patterns[v]
            elif form == "global":
                x[i] = x[i] + self.shift[v][:, None, None]
        return x


# ----------------------------------------------------------------------------------------- a run's data
def _stratified(y, n, rng):
    """n indices with classes as equal as possible (round robin over classes in random order)."""
    by = [list(rng.permutation(np.nonzero(y.numpy() == c)[0])) for c in range(int(y.max()) + 1)]
    out, c = [], 0
    while len(out) < n:
        if by[c % len(by)]:
            out.append(by[c % len(by)].pop())
        c += 1
    return np.array(sorted(out))


def run_data(spec):
    """Everything a run needs, deterministic in its spec: base images, the marker, per-split values and
    placements, noise. Returns a dict of tensors and the Marker (or None)."""
    x, obj, y, parts, k, sigma = base_data(spec["dataset"], spec["seed"])
    rng = np.random.default_rng(hash_seed(spec["id"]))
    side, c = x.shape[-1], x.shape[1]
    marker = None
    if spec["family"] is not None:
        marker = Marker(spec["family"], spec["dataset"], k, c, side, spec["seed"])
    noise = torch.from_numpy(rng.normal(0, sigma, size=tuple(x.shape)).astype(np.float32))
    out = {"k": k, "marker": marker}
    for part in ("train", "val", "test"):
        idx = parts[part]
        xi, oi, yi = x[idx], obj[idx], y[idx]
        vals = train_values(marker, yi, rng, spec["kind"])
        if part == "val" and marker is not None and marker.f["val"] == "absent" and spec["kind"] == "shortcut":
            vals = np.full(len(yi), -1)
        where = marker.place(oi, rng) if marker is not None else np.zeros((len(yi), 2), dtype=np.int64)
        out[part] = dict(x=xi, obj=oi, y=yi, vals=vals, where=where, noise=noise[idx])
    return out


def train_values(marker, y, rng, kind):
    """The mark values as in training: own code (AGREE) or a random class's; a watermark on MARK_P of its
    classes' images; clean 'useless' runs: a uniformly random class's code on every image."""
    n = len(y)
    if marker is None:
        return np.full(n, -1)
    y = y.numpy()
    rand = rng.integers(0, marker.k, size=n)
    if kind == "useless":
        if marker.f["scope"] == "watermark":
            return np.where(rng.random(n) < MARK_P * len(marker.marked) / marker.k,
                            np.array(marker.marked)[rng.integers(0, len(marker.marked), size=n)], -1)
        return rand
    if marker.f["scope"] == "watermark":
        return np.where(np.isin(y, marker.marked) & (rng.random(n) < MARK_P), y, -1)
    return np.where(rng.random(n) < AGREE, y, rand)


def render(marker, part, values):
    """Images of a split with the given mark values, noise added last."""
    x = part["x"] if marker is None else marker.draw(part["x"], part["obj"], part["where"], values)
    return x + part["noise"]


def hash_seed(text):
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def image_key(x):
    """A key for one image (C, H, W), independent of device and of being a view."""
    return hashlib.sha1(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------- models
class PlainCNN(nn.Module):
    def __init__(self, c, k, side):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(32 * (side // 4) ** 2, k)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class SmallResNet(nn.Module):
    def __init__(self, c, k, side):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2))
        self.head = nn.Linear(32, k)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def make_model(arch, c, k, side):
    return (PlainCNN if arch == "plain" else SmallResNet)(c, k, side)


# ------------------------------------------------------------------------------------- ground truth
def mcnemar_p(b, c):
    """Exact one-sided McNemar p: P(Binomial(b + c, 1/2) >= b), b = right with the shortcut and wrong
    without it, c = the reverse."""
    from scipy.stats import binom
    return float(binom.sf(b - 1, b + c, 0.5)) if b + c else 1.0


@torch.no_grad()
def predict(model, x, batch=512):
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def truth_inputs(d, spec):
    """The test images of the ground truth, rendered once per run: as in training, with the shortcut
    randomised (a uniformly random class's code; a watermark removed) and with another class c's shortcut
    pasted in (c in the watermarked classes, or a random other class)."""
    marker, te = d["marker"], d["test"]
    y, vals = te["y"], te["vals"]
    out = dict(y=y, x=render(marker, te, vals))
    if marker is None:
        return out
    rng = np.random.default_rng(hash_seed(spec["id"] + "/truth"))
    k, n = marker.k, len(y)
    carries = vals >= 0
    if marker.f["scope"] == "watermark":
        rand_vals = np.full(n, -1)
        target = np.array(marker.marked)[rng.integers(0, len(marker.marked), size=n)]
    else:
        rand_vals = np.where(carries, rng.integers(0, k, size=n), -1)
        target = (y.numpy() + rng.integers(1, k, size=n)) % k
    return dict(out, carries=carries, x_rand=render(marker, te, rand_vals), target=target,
                other=target != y.numpy(), x_paste=render(marker, te, target))


def truth_at(model, ti):
    """One epoch's ground truth on the test split (see the module docstring)."""
    y = ti["y"]
    pred = predict(model, ti["x"])
    out = {"test_acc": float((pred == y).float().mean())}
    if "carries" not in ti:
        return out
    carries, target, other = ti["carries"], ti["target"], ti["other"]
    pred_r = predict(model, ti["x_rand"])
    ok, ok_r = (pred == y).numpy()[carries], (pred_r == y).numpy()[carries]
    b, c = int((ok & ~ok_r).sum()), int((~ok & ok_r).sum())
    pred_p = predict(model, ti["x_paste"])
    reliance = float(ok.mean() - ok_r.mean()) if carries.any() else 0.0
    p = mcnemar_p(b, c)
    return dict(out, n_carrying=int(carries.sum()), acc_with=float(ok.mean()), acc_randomised=float(ok_r.mean()),
                reliance=reliance, mcnemar_b=b, mcnemar_c=c, p=p,
                relies=bool(reliance >= MIN_RELIANCE and p <= MAX_P),
                flip=float((pred_p.numpy() == target)[other].mean()),
                flip_before=float((pred.numpy() == target)[other].mean()))


# ---------------------------------------------------------------------------------------- training
def _object_part_boxes(obj, side, s, key):
    """Per image, a box of side s centred on a random object pixel (chosen by a seed from ``key``)."""
    rng = np.random.default_rng(hash_seed(key))
    m = torch.zeros_like(obj)
    for i in range(len(obj)):
        ys, xs = torch.nonzero(obj[i], as_tuple=True)
        j = rng.integers(len(ys)) if len(ys) else 0
        cy, cx = (int(ys[j]), int(xs[j])) if len(ys) else (side // 2, side // 2)
        t, lf = min(max(cy - s // 2, 0), side - s), min(max(cx - s // 2, 0), side - s)
        m[i, t:t + s, lf:lf + s] = True
    return m


def detector_data(d, spec):
    """Probe (128 stratified validation samples, the shortcut as in validation) and donor (256 stratified
    training samples, as in training) with their masks: the shortcut's pixels ('mark'), where it would be
    ('target': = mark where drawn; for fixed, frame and background forms also where it is absent), the
    object, and a box over an object part."""
    marker = d["marker"]
    rng = np.random.default_rng(hash_seed(spec["id"] + "/probe"))
    out = {}
    side = d["train"]["x"].shape[-1]
    s_ref = SIZES[spec["dataset"]]["large"]
    for name, part, n in (("probe", "val", N_PROBE), ("donor", "train", N_DONOR)):
        p = d[part]
        idx = torch.as_tensor(_stratified(p["y"], n, rng))
        sub = {key: (v[idx] if torch.is_tensor(v) else v[idx.numpy()]) for key, v in p.items()}
        out[f"{name}_x"] = render(marker, sub, sub["vals"])
        out[f"{name}_y"] = sub["y"]
        out[f"{name}_obj"] = sub["obj"]
        out[f"{name}_part"] = _object_part_boxes(sub["obj"], side, s_ref, spec["id"] + "/" + name)
        if marker is not None:
            region = marker.region(sub["obj"], sub["where"])
            drawn = torch.as_tensor(sub["vals"] >= 0)[:, None, None]
            out[f"{name}_mark"] = region & drawn
            whole = marker.f["position"] in ("fixed", "background", "everywhere") or marker.f["form"] == "frame"
            out[f"{name}_target"] = region if whole else region & drawn
    return out


def train_run(spec, cache, log=print):
    """Train one run, checkpoint every epoch, write its ground truth. Skips a run whose truth.json exists."""
    rd = Path(cache) / spec["id"]
    if (rd / "truth.json").exists():
        return None
    rd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(hash_seed(spec["id"] + "/init"))
    d = run_data(spec)
    tr = d["train"]
    x = render(d["marker"], tr, tr["vals"])
    y = tr["y"]
    c, side = x.shape[1], x.shape[-1]
    (rd / "meta.json").write_text(json.dumps(dict(spec, k=d["k"], channels=c, side=side, epochs=EPOCHS,
                                                  marked=d["marker"].marked if d["marker"] else None), indent=1))
    torch.save(detector_data(d, spec), rd / "data.pt")
    ti = truth_inputs(d, spec)
    t_data = time.perf_counter() - t0
    model = make_model(spec["arch"], c, d["k"], side)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(hash_seed(spec["id"] + "/order"))
    truth, t_train, t_truth = [], 0.0, 0.0
    for epoch in range(EPOCHS):
        t1 = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        model.eval()
        torch.save(model.state_dict(), rd / f"epoch{epoch}.pt")
        t2 = time.perf_counter()
        truth.append(dict(epoch=epoch, **truth_at(model, ti)))
        t_train, t_truth = t_train + t2 - t1, t_truth + time.perf_counter() - t2
    secs = dict(data=t_data, train=t_train, truth=t_truth, total=time.perf_counter() - t0)
    (rd / "truth.json").write_text(json.dumps(dict(id=spec["id"], epochs=truth, seconds=secs), indent=1))
    last = truth[-1]
    log(f"{spec['id']:32s} {secs['total']:5.1f}s  test acc {last['test_acc']:.3f}"
        + (f"  reliance {last['reliance']:+.3f} flip {last['flip']:.2f} relies@{first_reliance(truth)}"
           if "reliance" in last else ""))
    return secs


def first_reliance(truth):
    """The detection deadline: the first epoch at which the run relies, or None."""
    return next((t["epoch"] for t in truth if t.get("relies")), None)


def load_run(cache, run_id):
    """Meta, detector data, truth and a function epoch -> eval-mode model, from the cache."""
    rd = Path(cache) / run_id
    meta = json.loads((rd / "meta.json").read_text())
    truth = json.loads((rd / "truth.json").read_text())
    data = torch.load(rd / "data.pt")

    def model_at(epoch):
        m = make_model(meta["arch"], meta["channels"], meta["k"], meta["side"])
        m.load_state_dict(torch.load(rd / f"epoch{epoch}.pt"))
        return m.eval()

    return meta, data, truth, model_at


# ---------------------------------------------------------------------------------------- regions
class MaskLookup:
    """A per-sample region: finds the generator's mask of any probe or donor image by a hash of its bytes;
    an image it does not know (e.g. an edited one) gets an empty mask. Call: (N, C, H, W) -> (N, H, W) bool."""

    def __init__(self, name, data, key):
        self.name, self.table = name, {}
        for part in ("probe", "donor"):
            for xi, mi in zip(data[f"{part}_x"], data[f"{part}_{key}"] if not callable(key) else key(data, part)):
                self.table[image_key(xi)] = mi
        self.misses = 0

    def __call__(self, inputs):
        out = torch.zeros(inputs.shape[0], *inputs.shape[-2:], dtype=torch.bool)
        for i, xi in enumerate(inputs):
            m = self.table.get(image_key(xi))
            if m is None:
                self.misses += 1
            else:
                out[i] = m
        return out.to(inputs.device)

    def __repr__(self):
        return f"MaskLookup({self.name!r}, {len(self.table)} images)"


def named_regions(meta, data):
    """The regions a user would name for a run: {name: box tuple | (H, W) bool | callable}. Shortcut and
    useless-mark runs: the mark's region(s) ('mark', plus the preset 'corners' for random-corner families).
    Clean runs (both kinds) also get background regions (the top-left 'corner' box of the families' large
    size, the presets 'corners' and 'border', the per-sample 'background') and a box of the large size over a
    random object pixel ('object_part'). The large size equals the presets' corner side (H/4)."""
    regions = {}
    if meta["family"] is not None:
        f = FAMILY[meta["family"]]
        if f["region_less"]:
            pass
        elif f["position"] == "fixed" and f["form"] != "frame":
            box = torch.nonzero(data["probe_target"].any(0))
            (t, l), (b, r) = box.min(0).values.tolist(), box.max(0).values.tolist()
            regions["mark"] = (t, l, b - t + 1, r - l + 1)
        elif f["form"] == "frame":
            regions["mark"] = data["probe_target"][0].clone()
        elif f["position"] == "background":
            regions["mark"] = MaskLookup("background", data, lambda d, part: ~d[f"{part}_obj"])
        else:
            regions["mark"] = MaskLookup("mark", data, "mark")
        if f["position"] == "corner":
            regions["corners"] = "corners"              # the library's preset: the four corner boxes, side H/4
    if meta["kind"] != "shortcut":
        if meta["family"] is not None:
            regions = {f"mark:{k}": v for k, v in regions.items()}
        s = SIZES[meta["dataset"]]["large"]
        regions.update({"corner": (0, 0, s, s), "corners": "corners", "border": "border",
                        "background": MaskLookup("background", data, lambda d, part: ~d[f"{part}_obj"]),
                        "object_part": MaskLookup("object_part", data, "part")})
    return regions


# ------------------------------------------------------------------------------------------- CLI
def cmd_split(args):
    if SPLIT_FILE.exists() and not args.force:
        print(f"{SPLIT_FILE} exists (committed); --force to redraw")
        print(SPLIT_FILE.read_text())
        return
    split = draw_split()
    split["families"] = FAMILIES
    split["combos"] = [f"{d}-{a}" for d, a in COMBOS]
    split["clean"] = dict(design_seeds=f"0..{N_CLEAN_DESIGN - 1}",
                          held_out_seeds=f"100..{100 + N_CLEAN_HELD_OUT - 1}",
                          per="dataset x architecture", even_seed="no shortcut",
                          odd_seed="a region-ful family's mark with a random code")
    SPLIT_FILE.write_text(json.dumps(split, indent=1) + "\n")
    print(json.dumps({k: split[k] for k in ("seed", "draws", "design", "held_out")}))


def cmd_train(args):
    torch.set_num_threads(1)
    runs = runs_of(args.split)
    if args.only:
        runs = [r for r in runs if any(o in r["id"] for o in args.only)]
    t0, done = time.perf_counter(), []
    for spec in runs:
        secs = train_run(spec, args.cache, log=lambda s: print(s, flush=True))
        if secs:
            done.append(secs)
    if done:
        tot = np.array([s["total"] for s in done])
        print(f"trained {len(done)} runs in {time.perf_counter() - t0:.0f} s: per run median {np.median(tot):.1f} s "
              f"(data {np.median([s['data'] for s in done]):.1f}, "
              f"training {np.median([s['train'] for s in done]):.1f}, "
              f"ground truth {np.median([s['truth'] for s in done]):.1f}); {len(runs) - len(done)} were cached")
    else:
        print(f"all {len(runs)} runs were cached")


def _truths(cache, split_name):
    out = []
    for spec in runs_of(split_name):
        f = Path(cache) / spec["id"] / "truth.json"
        if f.exists():
            out.append((spec, json.loads(f.read_text())))
    return out


def _fmt_epochs(xs):
    return ",".join("-" if x is None else str(x) for x in xs)


def cmd_truth(args):
    print("Ground truth on the test split (reliance = accuracy with the shortcut as in training - randomised, on "
          "the test images carrying it; relies: reliance >= 0.05 and McNemar p <= 0.01)\n")
    for split_name in ("design", "held_out"):
        rows = _truths(args.cache, split_name)
        print(f"### {split_name}\n")
        print("| family | form, position, scope, validation | runs | relying | median reliance (last epoch) "
              "| median flip (before) "
              "| deadline epoch per run (d/s: digits/shapes, p/r: plain/resnet; -: never relies) "
              "| median test acc |")
        print("|---|---|---|---|---|---|---|---|")
        for fam in load_split()[split_name]:
            f = FAMILY[fam]
            fr = [t for s, t in rows if s["family"] == fam]
            if not fr:
                print(f"| {fam} | not trained |")
                continue
            last = [t["epochs"][-1] for t in fr]
            dl = [first_reliance(t["epochs"]) for t in fr]
            per_run = ", ".join(f"{s['dataset'][0]}{s['arch'][0]} {'-' if d is None else d}"
                                for (s, _), d in zip([(s, t) for s, t in rows if s["family"] == fam], dl))
            print(f"| {fam} | {f['form']}, {f['position']}, {f['scope']}, {f['val']} | {len(fr)} "
                  f"| {sum(d is not None for d in dl)}/{len(fr)} "
                  f"| {np.median([l['reliance'] for l in last]):+.3f} "
                  f"| {np.median([l['flip'] for l in last]):.2f} ({np.median([l['flip_before'] for l in last]):.2f}) "
                  f"| {per_run} | {np.median([l['test_acc'] for l in last]):.2f} |")
        print()
    for split_name in CLEAN_SPLITS:
        rows = _truths(args.cache, split_name)
        if not rows:
            continue
        none = [t for s, t in rows if s["kind"] == "clean"]
        useless = [t for s, t in rows if s["kind"] == "useless"]
        rel = [t for t in useless if first_reliance(t["epochs"]) is not None]
        maxrel = max((e["reliance"] for t in useless for e in t["epochs"]), default=float("nan"))
        print(f"### {split_name}: {len(rows)} runs ({len(none)} without a mark, {len(useless)} with a useless mark); "
              f"median test acc {np.median([t['epochs'][-1]['test_acc'] for _, t in rows]):.2f}; useless-mark runs "
              f"measured as relying at some epoch: {len(rel)} {[t['id'] for t in rel]}; "
              f"largest reliance {maxrel:+.3f}\n")
    if args.runs:
        print("| run | reliance per epoch (* relies) | flip per epoch | test acc per epoch |")
        print("|---|---|---|---|")
        for s in ("design", "held_out") + CLEAN_SPLITS:
            for spec, t in _truths(args.cache, s):
                ep = t["epochs"]
                rel = (" ".join(f"{e['reliance']:+.2f}{'*' if e['relies'] else ''}" for e in ep)
                       if "reliance" in ep[0] else "-")
                flip = " ".join(f"{e['flip']:.2f}" for e in ep) if "flip" in ep[0] else "-"
                print(f"| {spec['id']} | {rel} | {flip} | {' '.join(format(e['test_acc'], '.2f') for e in ep)} |")
        print()
    secs = [t["seconds"]["total"] for s in ("design", "held_out") + CLEAN_SPLITS
            for _, t in _truths(args.cache, s)]
    if secs:
        print(f"training time: {len(secs)} runs, median {np.median(secs):.1f} s per run, "
              f"total {sum(secs) / 60:.1f} min")


def _parse_config(items):
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _coverage(masks, target):
    return float((masks.bool() & target).sum() / target.sum()) if target.any() else float("nan")


def evaluate_run(spec, cache, mode, api, config_kwargs, epochs):
    """One run through the detector at the given epochs: a list of rows (named) or candidate lists (discovery)."""
    ShortcutConfig, check_region, discover, input_x_gradient = api
    meta, data, truth, model_at = load_run(cache, spec["id"])
    px, py, dx, dy = data["probe_x"], data["probe_y"], data["donor_x"], data["donor_y"]
    rows = []
    if mode == "named":
        regions = named_regions(meta, data)
        if not regions:
            return dict(id=spec["id"], region_less=True, rows=[])
        for e in epochs:
            model = model_at(e)
            for name, region in regions.items():
                t = time.perf_counter()
                v = check_region(model, px, py, dx, dy, region, config=ShortcutConfig(**config_kwargs), seed=0)
                dt = time.perf_counter() - t
                rows.append(dict(epoch=e, region=name, alarm=bool(v.alarm),
                                 stats={k: float(x) for k, x in v.stats.items()}, ms=1000 * dt / len(px)))
        return dict(id=spec["id"], rows=rows)
    target = data.get("probe_target")
    for e in epochs:
        model = model_at(e)
        t = time.perf_counter()
        # the maps ShortcutDiscovery computes by default (Input x Gradient of the labels), for the model's candidates
        maps = input_x_gradient(model, px, target=py)
        donor_maps = input_x_gradient(model, dx, target=dy)  # for each sample's attribution peak, donors included
        found = discover(model, px, py, dx, dy, config=ShortcutConfig(**config_kwargs), seed=0, maps=maps,
                         donor_maps=donor_maps)
        dt = time.perf_counter() - t
        cands = [dict(rank=i, name=str(c.name), alarm=bool(c.verdict.alarm),
                      coverage=(_coverage(c.masks, target) if target is not None and spec["kind"] == "shortcut"
                                else None),
                      stats={k: float(x) for k, x in c.verdict.stats.items()}) for i, c in enumerate(found)]
        rows.append(dict(epoch=e, candidates=cands, ms=1000 * dt / len(px)))
    return dict(id=spec["id"], rows=rows)


def cmd_evaluate(args):
    torch.set_num_threads(args.threads)
    try:
        from lightning_xai.attribution import input_x_gradient
        from lightning_xai.shortcuts import ShortcutConfig, check_region, discover
    except ImportError as err:
        sys.exit(f"lightning_xai.shortcuts does not offer the detector interface yet ({err}); "
                 "the training caches and `truth` do not need it")
    api = (ShortcutConfig, check_region, discover, input_x_gradient)
    config_kwargs = _parse_config(args.config)
    out_dir = Path(args.cache) / "_eval" / args.tag / args.mode
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in runs_of(args.split):
        if args.only and not any(o in spec["id"] for o in args.only):
            continue
        if not (Path(args.cache) / spec["id"] / "truth.json").exists():
            print(f"{spec['id']}: not trained, skipped (run `train --split {args.split}`)")
            continue
        f = out_dir / f"{spec['id']}.json"
        if f.exists() and not args.fresh:
            res = json.loads(f.read_text())
        else:
            res = evaluate_run(spec, args.cache, args.mode, api, config_kwargs, args.epochs or list(range(EPOCHS)))
            res["config"] = config_kwargs
            f.write_text(json.dumps(res))
        truth = json.loads((Path(args.cache) / spec["id"] / "truth.json").read_text())
        results.append((spec, res, truth))
    evaluated = sorted({row["epoch"] for _, res, _ in results for row in res["rows"]})
    print(f"{len(results)} runs; epochs evaluated: {_fmt_epochs(evaluated)} (of 0-{EPOCHS - 1}); "
          f"results in {out_dir}\n")
    if args.split in CLEAN_SPLITS:
        _report_clean(results, args.mode)
    else:
        _report_shortcut(results, args.mode)


def _top3_hit(row, region_less=False):
    """A candidate among the first 3 whose masks cover at least half of the shortcut's probe pixels; for a
    region-less shortcut (it is in every pixel, so coverage says nothing) a candidate among the first 3 that
    alarms."""
    if region_less:
        return any(c["alarm"] for c in row["candidates"][:3])
    return any((c["coverage"] or 0) >= 0.5 for c in row["candidates"][:3])


def _report_shortcut(results, mode):
    print(f"{mode} mode; deadline = first epoch the run relies on its shortcut (test split); delay = first alarm - "
          "deadline (<= 0 is in time)\n")
    fams = sorted({s["family"] for s, _, _ in results})
    tot = dict(relied=0, in_time=0, late=0, hit=0, disc=0)
    if mode == "named":
        print("| family | region | runs | relied | detected in time | late | missed | delays "
              "| alarms on non-relying runs "
              "| ms / probe sample / region |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    else:
        print("| family | runs | relied | top-3 hit by deadline | top-3 hit at last epoch | alarm by deadline "
              "| ms / probe sample |")
        print("|---|---|---|---|---|---|---|")
    for fam in fams:
        fr = [(s, r, t) for s, r, t in results if s["family"] == fam]
        deadlines = [first_reliance(t["epochs"]) for _, _, t in fr]
        relied = sum(d is not None for d in deadlines)
        if mode == "named":
            if all(r.get("region_less") for _, r, _ in fr):
                print(f"| {fam} | region-less: discovery only | {len(fr)} | {relied} | | | | | | |")
                continue
            for region in sorted({row["region"] for _, r, _ in fr for row in r["rows"]}):
                in_time = late = missed = false = 0
                delays, ms = [], []
                for (s, r, t), dl in zip(fr, deadlines):
                    rows = [row for row in r["rows"] if row["region"] == region]
                    ms += [row["ms"] for row in rows]
                    first = min((row["epoch"] for row in rows if row["alarm"]), default=None)
                    if dl is None:
                        false += first is not None
                    elif first is None:
                        missed += 1
                    else:
                        delays.append(first - dl)
                        in_time += first <= dl
                        late += first > dl
                print(f"| {fam} | {region} | {len(fr)} | {relied} | {in_time} | {late} | {missed} "
                      f"| {_fmt_epochs(delays)} | {false} | {np.median(ms):.2f} |")
                if region == "mark":
                    tot["relied"] += relied
                    tot["in_time"] += in_time
                    tot["late"] += late
        else:
            hit_dl = hit_last = alarm_dl = 0
            ms = []
            for (s, r, t), dl in zip(fr, deadlines):
                ms += [row["ms"] for row in r["rows"]]
                if dl is None:
                    continue
                by = [row for row in r["rows"] if row["epoch"] <= dl]
                hit_dl += any(_top3_hit(row, FAMILY[fam]["region_less"]) for row in by)
                hit_last += _top3_hit(r["rows"][-1], FAMILY[fam]["region_less"])
                alarm_dl += any(c["alarm"] for row in by for c in row["candidates"])
            print(f"| {fam} | {len(fr)} | {relied} | {hit_dl}/{relied} | {hit_last}/{relied} | {alarm_dl}/{relied} "
                  f"| {np.median(ms):.2f} |")
            tot["relied"] += relied
            tot["hit"] += hit_dl
            tot["disc"] += alarm_dl
    if mode == "named":
        print(f"\nregion 'mark', all families: {tot['in_time']}/{tot['relied']} relied-on shortcuts detected in time, "
              f"{tot['late']} late")
    else:
        print(f"\nall families: top-3 hit by the deadline {tot['hit']}/{tot['relied']}, an alarm by the deadline "
              f"{tot['disc']}/{tot['relied']}")


def _report_clean(results, mode):
    by_region, runs_alarmed, ms = {}, [], []
    for s, r, t in results:
        alarmed = False
        for row in r["rows"]:
            ms.append(row["ms"])
            if mode == "named":
                key = row["region"].split(":")[0] if row["region"].startswith("mark") else row["region"]
                by_region.setdefault(key, [0, 0])
                by_region[key][1] += 1
                by_region[key][0] += row["alarm"]
                alarmed |= row["alarm"]
            else:
                for c in row["candidates"]:
                    by_region.setdefault(c["name"], [0, 0])
                    by_region[c["name"]][1] += 1
                    by_region[c["name"]][0] += c["alarm"]
                    alarmed |= c["alarm"]
        if alarmed:
            runs_alarmed.append(s["id"])
    print(f"{mode} mode on {len(results)} clean runs: {len(runs_alarmed)} with a false alarm (any epoch, any "
          f"{'region' if mode == 'named' else 'candidate'}) = {len(runs_alarmed) / max(len(results), 1):.3f} per run")
    print("alarms / checks by " + ("region" if mode == "named" else "candidate name") + ": "
          + ", ".join(f"{k} {a}/{n}" for k, (a, n) in sorted(by_region.items())))
    if ms:
        print(f"cost: median {np.median(ms):.2f} ms per probe sample{' per region' if mode == 'named' else ''}")
    for rid in runs_alarmed:
        print("  false alarm:", rid)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=DEFAULT_CACHE)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="draw the design / held-out split (done once; committed)")
    s.add_argument("--force", action="store_true")
    s = sub.add_parser("train", help="train and cache the runs of a split (skips cached runs)")
    s.add_argument("--split", default="all", choices=["design", "held_out", *CLEAN_SPLITS,
                                                      "all"])
    s.add_argument("--only", nargs="*", help="substrings of run ids to train")
    s = sub.add_parser("truth", help="the ground-truth table from the cache")
    s.add_argument("--runs", action="store_true", help="also one row per run, every epoch")
    s = sub.add_parser("evaluate", help="run the detector on cached checkpoints")
    s.add_argument("--split", required=True, choices=["design", "held_out", *CLEAN_SPLITS])
    s.add_argument("--mode", required=True, choices=["named", "discovery"])
    s.add_argument("--epochs", type=int, nargs="*", help="epochs to check (default: all)")
    s.add_argument("--only", nargs="*", help="substrings of run ids")
    s.add_argument("--config", nargs="*", help="ShortcutConfig overrides, key=value (value parsed as JSON)")
    s.add_argument("--tag", default="default", help="results go to <cache>/_eval/<tag>/<mode>/ (reused unless --fresh)")
    s.add_argument("--fresh", action="store_true")
    s.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    {"split": cmd_split, "train": cmd_train, "truth": cmd_truth, "evaluate": cmd_evaluate}[args.cmd](args)


if __name__ == "__main__":
    main()
