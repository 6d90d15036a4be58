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
BATCH = 64
LR = 2e-3
AGREE = 0.95          # share of training images whose code is their own class's (the rest: a random class)
MARK_P = 0.9          # share of a watermarked class's images that carry its mark
N_PROBE, N_DONOR = 128, 256
MIN_RELIANCE, MAX_P = 0.05, 0.01
DATASETS = ("digits", "shapes")
ARCHS = ("plain", "resnet")
COMBOS = [(d, a) for d in DATASETS for a in ARCHS]

# --------------------------------------------------------------------------------------------- families
# size: box side in px per dataset (digits 24x24, shapes 32x32); contrast: blend weight of the mark.
SIZES = {"digits": {"small": 3, "large": 5}, "shapes": {"small": 4, "large": 7}}
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
    """Run specs (dicts) of a split: 'design', 'held_out', 'clean' (held-out clean), 'clean_design', 'all'."""
    split = split or load_split()
    if split_name == "all":
        return [r for s in ("design", "held_out", "clean_design", "clean") for r in runs_of(s, split)]
    runs = []
    if split_name in ("design", "held_out"):
        for fam in split[split_name]:
            for d, a in COMBOS:
                runs.append(dict(kind="shortcut", family=fam, dataset=d, arch=a, seed=0, split=split_name,
                                 id=f"{fam}-{d}-{a}-s0"))
        return runs
    if split_name in ("clean", "clean_design"):
        first, n = (100, N_CLEAN_HELD_OUT) if split_name == "clean" else (0, N_CLEAN_DESIGN)
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
    raise ValueError(f"Expected split to be one of design, held_out, clean, clean_design, all, but got {split_name!r}")


# ------------------------------------------------------------------------------------------- base images
_BASE_CACHE: dict = {}


def _digits_base(seed):
    """Digits at 16x16 (bilinear x2) on a 24x24 canvas at a random offset in [1, 7]; object = value > 0.3.
    A fixed stratified-free split of the 1797 images: 900 train, 297 validation, 600 test."""
    from sklearn.datasets import load_digits
    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0          # (1797, 1, 8, 8)
    up = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)   # (1797, 1, 16, 16)
    rng = np.random.default_rng(1000 + seed)
    order = np.random.default_rng(7).permutation(len(img))
    x = torch.zeros(len(img), 1, 24, 24)
    for i in range(len(img)):
        oy, ox = rng.integers(1, 8, size=2)
        x[i, :, oy:oy + 16, ox:ox + 16] = up[i]
    obj = x[:, 0] > 0.3
    y = torch.tensor(d.target, dtype=torch.long)
    parts = {"train": order[:900], "val": order[900:1197], "test": order[1197:]}
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
    """Six shapes (one class each), random colour, centre and radius 5-10 px, on random 32-128 px crops of
    the two sample photos resized to 32x32. 1500 train, 400 validation, 800 test."""
    photos = _sample_photos()
    rng = np.random.default_rng(2000 + seed)
    n = 2700
    y = torch.tensor(np.arange(n) % 6, dtype=torch.long)[torch.as_tensor(rng.permutation(n))]
    x = torch.zeros(n, 3, 32, 32)
    obj = torch.zeros(n, 32, 32, dtype=torch.bool)
    for i in range(n):
        ph = photos[rng.integers(2)]
        s = int(rng.integers(32, 129))
        top, left = rng.integers(0, ph.shape[1] - s), rng.integers(0, ph.shape[2] - s)
        bg = F.interpolate(ph[None, :, top:top + s, left:left + s], size=(32, 32), mode="area")[0]
        r = float(rng.uniform(5, 10))
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
            self.thick = 1 if self.f["size"] == "small" else 2
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
            if len({tuple(r.tolist()) for r in b}) == k and (b.float().mean(1) >= 0.25).all() \
                    and (b.float().mean(1) <= 0.75).all():
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
            t, l = where[i]
            m[i, t:t + h, l:l + w] = True
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
                t, l = where[i]
                if form == "glyph":
                    patch = self.glyphs[v].expand(self.c, -1, -1)
                else:
                    patch = self.bits[v][None, None, :].expand(self.c, self.thick, -1)
                h, w = patch.shape[-2:]
                x[i, :, t:t + h, l:l + w] = (1 - a) * x[i, :, t:t + h, l:l + w] + a * patch
            elif form == "texture" and self.f["position"] == "background":
                yy, xx = torch.meshgrid(torch.arange(self.side), torch.arange(self.side), indexing="ij")
                th = float(self.theta[v])
                grating = torch.sin(2 * math.pi * (xx * math.cos(th) + yy * math.sin(th)) / 4.0)
                x[i] = torch.where(m, x[i] + 0.5 * a * grating, x[i])
            elif form == "texture":
                t, l = where[i]
                x[i, :, t:t + self.s, l:l + self.s] = (1 - a) * x[i, :, t:t + self.s, l:l + self.s] + a * self.patterns[v]
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
        self.stem = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2))
        self.head = nn.Linear(32, k)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def make_model(arch, c, k, side):
    return (PlainCNN if arch == "plain" else SmallResNet)(c, k, side)


# ------------------------------------------------------------------------------------- CLI: split
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    {"split": cmd_split}[args.cmd](args)


if __name__ == "__main__":
    main()
