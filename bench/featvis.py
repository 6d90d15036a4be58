"""Benchmark: seconds for 10 class images at the default settings, and cost per step vs forward+backward.

Run from the repository root::

    python bench/featvis.py            # 1x8x8 and 1x32x32, 1 and 2 intra-op threads
    python bench/featvis.py --repeats 5 --threads 1

The model is ``tests/helpers.small_cnn`` (random weights: timing does not depend on training). The
ratio column is (seconds per render step) / (seconds of one forward + backward of the same batch of
10 in training mode), measured in the same run, so it is meaningful on a noisy shared machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import small_cnn  # noqa: E402

from lightning_xai.featvis import render  # noqa: E402


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=256, help="render steps (the default of render/FeatureVisMonitor)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts to time")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for side in (8, 32):
            model = small_cnn()
            x = torch.rand(10, 1, side, side)
            y = torch.arange(10)

            def train_step():
                model.train()
                loss = F.cross_entropy(model(x), y)
                torch.autograd.grad(loss, list(model.parameters()))

            for _ in range(5):
                train_step()
            fb = _best(lambda: [train_step() for _ in range(20)], args.repeats) / 20
            model.eval()
            render(model, list(range(10)), (1, side, side), steps=8)  # warm-up
            total = _best(lambda: render(model, list(range(10)), (1, side, side), steps=args.steps), args.repeats)
            per_step = total / args.steps
            rows.append((threads, f"1x{side}x{side}", total, per_step * 1e3, fb * 1e3, per_step / fb))
    print(f"featvis render: 10 class images, small_cnn, {args.steps} steps, param='fourier', default transforms and "
          f"regularisers; best of {args.repeats}")
    print("| threads | input | seconds (10 images) | ms / step | ms / fwd+bwd (batch 10) | step / fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for threads, shape, total, step_ms, fb_ms, ratio in rows:
        print(f"| {threads} | {shape} | {total:.2f} | {step_ms:.2f} | {fb_ms:.2f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
