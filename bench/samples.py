"""Benchmark: finding planted label errors on digits with representer points, and the cost of the refit.

    python bench/samples.py [--flip 0.05] [--epochs 10 40] [--seeds 0 1 2] [--lam 1e-3]

Per seed and training length, a small CNN is trained on the digits train split with a share of labels
flipped to a random other class; then every training sample is scored and the top k (k = number
flipped) are compared with the planted flips (precision at k):

* ``|alpha_i,y_i| (labels)``: refit on the given labels (the paper's label-error setting, the monitor's default),
* ``||alpha_i|| (labels)``: the label-free norm on the same refit,
* ``|alpha_i,y_i| (probs)``: refit on the model's own probabilities (the refit that explains the model),
* ``loss``: the model's cross-entropy on the given label (the usual baseline),
* ``random``: the flip rate (expected precision of a random ranking).

Times are given as ratios to one no-grad forward pass over the same training samples (measured in the
same run), since absolute times on shared machines are noisy.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_xai.datasets import load_digits_tensors, split_indices
from lightning_xai.samples import capture_features, representer_points, suspect_scores
from lightning_xai.samples._features import last_linear
from lightning_xai.samples import _representer as _rep


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))


def train(x, y, epochs, seed):
    torch.manual_seed(seed)
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def precision_at_k(scores, flipped_mask, k):
    return float(flipped_mask[scores.topk(k).indices].float().mean())


def timed(fn, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lam", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier timings on a shared 2-core machine

    x, y = load_digits_tensors()
    tr, _ = split_indices(x.shape[0], 0.3, seed=0)
    x, y_clean = x[tr], y[tr]
    n = x.shape[0]
    k = int(round(args.flip * n))
    rows = []
    timing = []
    for epochs in args.epochs:
        for seed in args.seeds:
            g = torch.Generator().manual_seed(1000 + seed)
            flipped = torch.randperm(n, generator=g)[:k]
            y = y_clean.clone()
            y[flipped] = (y[flipped] + torch.randint(1, 10, (k,), generator=g)) % 10
            mask = torch.zeros(n, dtype=torch.bool)
            mask[flipped] = True
            net = train(x, y, epochs, seed)
            with torch.no_grad():
                t_fwd, (feats, logits) = timed(lambda: capture_features(net, last_linear(net), x))
                t_lab, fit_lab = timed(lambda: representer_points(feats, y, lam=args.lam, num_classes=10))
                t_prob, fit_prob = timed(lambda: representer_points(feats, logits.softmax(1), lam=args.lam))
                old = _rep._NEWTON_MAX_PARAMS
                _rep._NEWTON_MAX_PARAMS = 0  # the L-BFGS path, for comparison
                try:
                    t_lbfgs, fit_lbfgs = timed(
                        lambda: representer_points(feats, y, lam=args.lam, num_classes=10, tol=1e-9), repeat=1)
                finally:
                    _rep._NEWTON_MAX_PARAMS = old
            loss = F.cross_entropy(logits, y, reduction="none")
            rows.append(dict(
                epochs=epochs, seed=seed,
                fit_train=float((logits.argmax(1) == y).float().mean()),
                memorised=float((logits.argmax(1)[mask] == y[mask]).float().mean()),
                alpha_label=precision_at_k(suspect_scores(fit_lab.alpha, y), mask, k),
                alpha_norm=precision_at_k(suspect_scores(fit_lab.alpha, mode="norm"), mask, k),
                alpha_probs=precision_at_k(suspect_scores(fit_prob.alpha, y), mask, k),
                loss=precision_at_k(loss, mask, k),
            ))
            timing.append(dict(fwd=t_fwd, newton_labels=t_lab, newton_probs=t_prob, lbfgs=t_lbfgs,
                               gap_newton=fit_lab.stationarity_gap, gap_lbfgs=fit_lbfgs.stationarity_gap,
                               it_newton=fit_lab.iterations, it_lbfgs=fit_lbfgs.iterations))

    print(f"digits train split: n={n}, flipped k={k} ({args.flip:.0%}), features d={feats.shape[1]}, lam={args.lam}, "
          f"seeds={args.seeds}\n")
    print("precision at k (mean over seeds; random = flip rate)")
    print("| epochs | train acc (given labels) | flips memorised | abs(alpha_i,y_i) (labels) | norm(alpha_i) (labels) "
          "| abs(alpha_i,y_i) (probs) | loss | random |")
    print("|---|---|---|---|---|---|---|---|")
    for epochs in args.epochs:
        sel = [r for r in rows if r["epochs"] == epochs]

        def mean(key):
            return sum(r[key] for r in sel) / len(sel)

        print(f"| {epochs} | {mean('fit_train'):.3f} | {mean('memorised'):.2f} | {mean('alpha_label'):.3f} | "
              f"{mean('alpha_norm'):.3f} | {mean('alpha_probs'):.3f} | {mean('loss'):.3f} | {args.flip:.3f} |")

    def med(key):
        vals = sorted(t[key] for t in timing)
        return vals[len(vals) // 2]

    print("\nrepresenter refit cost (median over runs; ratio to one no-grad forward over the same samples)")
    print("| solver | time / forward pass | iterations | stationarity gap max abs(Theta - sum alpha_i f_i^T) |")
    print("|---|---|---|---|")
    print(f"| Newton, labels (default) | {med('newton_labels') / med('fwd'):.1f}x | {med('it_newton')} | "
          f"{max(t['gap_newton'] for t in timing):.1e} |")
    print(f"| Newton, probabilities | {med('newton_probs') / med('fwd'):.1f}x | - | - |")
    print(f"| L-BFGS (tol 1e-9) | {med('lbfgs') / med('fwd'):.1f}x | {med('it_lbfgs')} | "
          f"{max(t['gap_lbfgs'] for t in timing):.1e} |")
    print(f"\none forward pass over {n} samples: {med('fwd') * 1e3:.0f} ms (median, 1 thread)")


if __name__ == "__main__":
    main()
