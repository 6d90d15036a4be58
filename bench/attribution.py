"""Benchmark the attribution cores against their physical floor and against Captum, in one run.

Model: the 2-conv ``small_cnn`` of the tests (BatchNorm, eval mode) on a batch of 64 images 1x28x28,
target = the predicted class (precomputed and passed to both libraries). For each method it prints
the median time over interleaved repeats, the floor measured in the same run (saliency / Grad-CAM:
one forward+backward of 64 rows; SmoothGrad: samples x that; IG: steps x that; occlusion: windows x
one no-grad forward of 64 rows) and the ratio to Captum with its best-practice batching
(IG ``internal_batch_size=64``, NoiseTunnel ``nt_samples_batch_size=4``, Occlusion ``ppe=1``).

Run:  python bench/attribution.py [--repeats 9] [--threads 1] [--sweep]
``--sweep`` also times our row caps (IG ``internal_batch_size``, SmoothGrad ``batch_size``, occlusion
``perturbations_per_eval``) to pick :data:`DEFAULT_MAX_ROWS`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_xai.attribution import (  # noqa: E402
    DEFAULT_MAX_ROWS,
    grad_cam,
    integrated_gradients,
    occlusion,
    saliency,
    smoothgrad,
)


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """Same architecture as ``tests/helpers.small_cnn`` (kept here so the benchmark does not import Lightning)."""
    features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
    return nn.Sequential(features, head)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run(configs: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median ms per config; configs are interleaved round-robin so load changes hit all alike."""
    for fn in configs.values():  # warm-up
        fn()
    samples: Dict[str, List[float]] = {k: [] for k in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            samples[name].append(timed(fn))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, Saliency

    torch.manual_seed(0)
    model = small_cnn().eval()
    x = torch.rand(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = model(x).argmax(1)
    layer = model[0][3]

    def fwd_bwd() -> None:
        leaf = x.clone().requires_grad_(True)
        torch.autograd.grad(model(leaf).gather(1, t.view(-1, 1)).sum(), leaf)

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    def captum_grad_cam() -> None:
        cam = LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
        LayerAttribution.interpolate(cam, (28, 28), "bilinear")

    windows = 13 * 13  # 4x4 window, stride 2 on 28x28
    methods: List[Tuple[str, Callable, Callable, str, float]] = [
        ("saliency", lambda: saliency(model, x, t), lambda: Saliency(model).attribute(x, target=t), "fb", 1),
        ("smoothgrad, 16 samples", lambda: smoothgrad(model, x, t, samples=16),
         lambda: NoiseTunnel(Saliency(model)).attribute(x, target=t, nt_type="smoothgrad", nt_samples=16,
                                                        nt_samples_batch_size=4, stdevs=0.15), "fb", 16),
        ("integrated gradients, 32 steps", lambda: integrated_gradients(model, x, t, steps=32),
         lambda: IntegratedGradients(model).attribute(x, target=t, n_steps=32, internal_batch_size=64), "fb", 32),
        ("occlusion 4x4, stride 2", lambda: occlusion(model, x, t, window=4, stride=2),
         lambda: Occlusion(model).attribute(x, sliding_window_shapes=(1, 4, 4), strides=(1, 2, 2), target=t,
                                            perturbations_per_eval=1), "f", windows),
        ("grad_cam (bilinear upsample)", lambda: grad_cam(model, x, t, layer=layer), captum_grad_cam, "fb", 1),
    ]
    configs: Dict[str, Callable[[], object]] = {"floor fb": fwd_bwd, "floor f": fwd}
    for name, ours, theirs, _, _ in methods:
        configs["ours " + name] = ours
        configs["captum " + name] = theirs
    med = run(configs, args.repeats)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch} x 1x28x28, "
          f"median of {args.repeats} interleaved repeats, DEFAULT_MAX_ROWS={DEFAULT_MAX_ROWS}")
    print(f"one fwd+bwd of {args.batch} rows: {med['floor fb']:.2f} ms; one forward: {med['floor f']:.2f} ms\n")
    print("| method | ours (ms) | floor (ms) | ours / floor | Captum (ms) | ours / Captum |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, _, unit, count in methods:
        floor = count * med["floor " + unit]
        ours, theirs = med["ours " + name], med["captum " + name]
        what = f"{count} x {'fwd+bwd' if unit == 'fb' else 'fwd'}" if count > 1 else (
            "fwd+bwd" if unit == "fb" else "fwd")
        print(f"| {name} | {ours:.1f} | {floor:.1f} ({what}) | {ours / floor:.2f} | {theirs:.1f} "
              f"| {ours / theirs:.2f} |")

    if args.sweep:
        sweep: Dict[str, Callable[[], object]] = {"floor fb": fwd_bwd, "floor f": fwd}
        for rows in (64, 128, 256, 512, 2048):
            sweep[f"IG 32 steps, {rows} rows/pass"] = (lambda r=rows: integrated_gradients(model, x, t, steps=32,
                                                                                           internal_batch_size=r))
        for rows in (64, 128, 256, 1024):
            sweep[f"SmoothGrad 16, {rows} rows/pass"] = lambda r=rows: smoothgrad(model, x, t, samples=16, batch_size=r)
        for ppe in (1, 2, 4, 16):
            sweep[f"occlusion, {ppe * args.batch} rows/pass"] = (lambda p=ppe: occlusion(
                model, x, t, window=4, stride=2, perturbations_per_eval=p))
        med = run(sweep, args.repeats)
        print("\n| row cap sweep | ms | / floor |")
        print("|---|---:|---:|")
        for name, ms in med.items():
            if name.startswith("floor"):
                continue
            floor = 32 * med["floor fb"] if name.startswith("IG") else 16 * med["floor fb"] if name.startswith(
                "Smooth") else windows * med["floor f"]
            print(f"| {name} | {ms:.1f} | {ms / floor:.2f} |")


if __name__ == "__main__":
    main()
