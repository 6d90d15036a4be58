"""Benchmark: seconds for 10 class images at the default settings, and cost per step vs forward+backward.

Run from the repository root::

    python bench/featvis.py            # 1x8x8 and 1x32x32, 1 and 2 intra-op threads
    python bench/featvis.py --repeats 5 --threads 1
    taskset -c 0 python bench/featvis.py --cifar --threads 1 --rounds 8   # the CIFAR-sized render against its floor

The model is ``tests/helpers.small_cnn`` (random weights: timing does not depend on training). The
ratio column is (seconds per render step) / (seconds of one forward + backward of the same batch of
10 in training mode), measured in the same run, so it is meaningful on a noisy shared machine.

``--cifar`` renders FeatureVisMonitor's default (10 class images of 3x32x32, 256 steps) on ``bench/cifar.py``'s
SmallCNN, briefly trained on its images, and prices the floor as ``bench/cifar.py`` does: the passes the callback
declares (10 images x (256 + 1/3)) at the model's forward+backward per sample (``cifar.pass_seconds``, batch 128),
measured before each render; process CPU time, renders and floors interleaved, medians and minima over the rounds.
It also times the model's own forward+backward of the 10 images per step (the input gradient, as a render step
takes it) so that the rest of a step, the render's overhead, is visible.

The floor's batch of 128 allocates buffers of several MB: in a short process glibc can hand them back to the system
after each pass and fault them in again on the next (about 6,000 page faults a pass measured, 0.1 ms a sample more),
while in a long fit the heap stays large. ``GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824:glibc.malloc.
mmap_threshold=1073741824`` keeps it so here (the render's own small buffers are not affected).
"""
from __future__ import annotations

import argparse
import os
import statistics
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


def _small(args) -> None:
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


def _trained_cifar_cnn(n: int = 12_000, epochs: int = 3):
    """bench/cifar.py's SmallCNN after a few epochs on its images (above 0.99 validation accuracy), in eval mode."""
    import cifar

    torch.manual_seed(0)
    model = cifar.SmallCNN()
    x, y = cifar.make_images(n, 0)
    x = x.float() / 255
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _model_step_seconds(model, k: int = 10, steps: int = 64) -> float:
    """Process CPU seconds of the model's forward+backward (input gradient) of ``k`` images, as one render step."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(k, 3, 32, 32).requires_grad_(True)
    minus_e = -torch.eye(k, 10)
    try:
        for _ in range(4):
            torch.autograd.grad(model(x), x, minus_e)
        start = time.process_time()
        for _ in range(steps):
            torch.autograd.grad(model(x), x, minus_e)
        return (time.process_time() - start) / steps
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _cifar(args) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cifar

    torch.set_num_threads(args.threads[0])
    model = _trained_cifar_cnn()
    images = list(range(10))
    render(model, images, (3, 32, 32), steps=8)  # warm-up
    runs, floors, model_steps = [], [], []
    for _ in range(args.rounds):
        per_sample = cifar.pass_seconds(model, repeats=5)[2]  # forward+backward per sample, process CPU, batch 128
        floors.append(len(images) * (args.steps + 1 / 3) * per_sample)
        model_steps.append(_model_step_seconds(model))
        start = time.process_time()
        render(model, images, (3, 32, 32), steps=args.steps)
        runs.append(time.process_time() - start)
        model.eval()
    run, floor, step = statistics.median(runs), statistics.median(floors), statistics.median(model_steps)
    print(f"CIFAR-sized render: 10 class images of 3x32x32, {args.steps} steps, defaults; {args.threads[0]} thread(s), "
          f"{args.rounds} rounds, process CPU time, load average {os.getloadavg()[0]:.2f}")
    print("| | median | min |")
    print("|---|---:|---:|")
    print(f"| render (s) | {run:.3f} | {min(runs):.3f} |")
    print(f"| floor (s): 10 x {args.steps + 1 / 3:.2f} x fwd+bwd per sample | {floor:.3f} | {min(floors):.3f} |")
    print(f"| run / floor | {run / floor:.2f} | {min(runs) / min(floors):.2f} |")
    print(f"| ms per step | {run / args.steps * 1e3:.2f} | {min(runs) / args.steps * 1e3:.2f} |")
    print(f"| model's fwd+bwd of the 10 images (ms per step) | {step * 1e3:.2f} | {min(model_steps) * 1e3:.2f} |")
    print(f"| the rest of a step (ms) | {(run / args.steps - step) * 1e3:.2f} | "
          f"{(min(runs) / args.steps - min(model_steps)) * 1e3:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=256, help="render steps (the default of render/FeatureVisMonitor)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts to time")
    parser.add_argument("--cifar", action="store_true", help="the CIFAR-sized render against its floor (first thread "
                        "count of --threads)")
    parser.add_argument("--rounds", type=int, default=5, help="--cifar: renders, each after its floor's measurement")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.cifar:
        _cifar(args)
    else:
        _small(args)


if __name__ == "__main__":
    main()
