"""Alain & Bengio's skip-connection pathology: layers a skip bypasses probe lower than where it lands."""
import torch
import torch.nn.functional as F
from torch import nn

from lightning_xai.datasets import load_digits_tensors
from lightning_xai.probes import ActivationCapture
from lightning_xai.probes._epoch import EpochProbe, control_table


class SkipMLP(nn.Module):
    """``inp`` then ``depth`` ReLU blocks; the output of ``inp`` is added back after block ``skip_to``."""

    def __init__(self, depth: int = 16, skip_to: int = 12, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
        self.land = nn.Identity()
        self.head = nn.Linear(width, 10)
        self.skip_to = skip_to

    def forward(self, x):
        h0 = h = self.inp(x)
        for i, block in enumerate(self.blocks, 1):
            h = block(h)
            if i == self.skip_to:
                h = self.land(h + h0)
        return self.head(h)


def _probe_accuracy(features, labels):
    probe = EpochProbe(holdout_every=5)
    probe.add(features, {"label": labels}, torch.arange(labels.shape[0]))
    probe.prepare({"label": 10}, {"label": control_table(labels)})
    pred, true = probe.predict()["label"]["holdout"]
    return float((pred == true).float().mean())


def test_layers_bypassed_by_a_skip_probe_lower_than_its_landing_layer():
    x, y = load_digits_tensors()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    model = SkipMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # brief training: the loss flows through the skip, the bypassed path stays poor
        for start in range(0, 1000, 100):
            opt.zero_grad()
            F.cross_entropy(model(x[start:start + 100]), y[start:start + 100]).backward()
            opt.step()
    model.eval()
    bypassed = [f"blocks.{i}" for i in range(5, 11)]
    with ActivationCapture(model, bypassed + ["inp", "land"]) as capture, torch.no_grad():
        model(x[1000:])
        feats = capture.pop()
    acc = {name: _probe_accuracy(f, y[1000:]) for name, f in feats.items()}
    assert acc["land"] > 0.8
    assert max(acc[name] for name in bypassed) < acc["land"] - 0.15, acc
