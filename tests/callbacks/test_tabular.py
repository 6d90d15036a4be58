"""TabularAttributionMonitor: the planted decisive feature gets the largest bar; events, hygiene, do-no-harm."""
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from helpers import DigitsModule, assert_unchanged, read_events, snapshot, tiny_trainer
from lightning_xai.callbacks._tabular import TabularAttributionMonitor, feature_importance

FEATURES = ["age", "height", "decisive", "noise/a", "noise b", "weight"]


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(FEATURES), generator=gen)
    y = (x[:, 2] + 0.1 * x[:, 0] > 0).long()  # feature 2 decides, feature 0 nudges
    return TensorDataset(x, y)


def _fit(tmp_path, callbacks, epochs=3):
    pl.seed_everything(0, workers=True)
    net = nn.Sequential(nn.Linear(len(FEATURES), 16), nn.ReLU(), nn.Linear(16, 2))
    module = DigitsModule(net=net, lr=0.05)
    train = DataLoader(_data(256, 0), batch_size=32, shuffle=True)
    val = DataLoader(_data(64, 1), batch_size=32)
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=epochs)
    trainer.fit(module, train, val)
    return module


def test_feature_importance():
    overall, per_class, values = feature_importance(torch.tensor([[1.0, -2.0], [3.0, float("nan")], [-1.0, 1.0]]),
                                                    torch.tensor([1, 0, 1]))
    assert overall.tolist() == pytest.approx([5 / 3, 1.0]) and values == [0, 1]
    assert per_class.tolist() == [[3.0, 0.0], [1.0, 1.5]]
    assert feature_importance(torch.ones(2, 3))[1] is None


def test_decisive_feature_gets_the_largest_bar_and_events_are_written(tmp_path):
    monitor = TabularAttributionMonitor(FEATURES, method=("integrated_gradients", {"steps": 16}), probe_samples=32)
    _fit(tmp_path, [monitor])
    acc = read_events(os.path.join(str(tmp_path), "tb", "version_0"))
    images = acc.Images("xai/tabular/integrated_gradients")
    assert len(images) == 3 and images[-1].height > 100
    last = {f: acc.Scalars(f"xai/tabular/integrated_gradients/{f.replace('/', '_')}")[-1].value for f in FEATURES}
    assert max(last, key=last.get) == "decisive", last
    assert last["decisive"] > 3 * max(v for k, v in last.items() if k not in ("decisive", "age"))


def test_monitor_does_no_harm_and_compute_is_clean(tmp_path):
    plain = _fit(tmp_path / "a", [], epochs=2)
    watched = _fit(tmp_path / "b", [TabularAttributionMonitor(FEATURES, method="saliency", probe_samples=16)], epochs=2)
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), k

    cb = TabularAttributionMonitor(FEATURES)
    watched.train()
    watched.net[0].weight.grad = torch.ones_like(watched.net[0].weight)
    x = torch.randn(5, len(FEATURES))
    before = snapshot(watched)
    with cb.explain_context(watched):
        out = cb.compute(watched, x, None)
    assert out["attr"].shape == (5, len(FEATURES))
    assert_unchanged(before, watched)


def test_bad_config():
    with pytest.raises(MisconfigurationException, match="feature_names"):
        TabularAttributionMonitor("age")
    with pytest.raises(MisconfigurationException, match="distinct"):
        TabularAttributionMonitor(["a", "a"])
    with pytest.raises(MisconfigurationException, match="grad_cam|Grad-CAM"):
        TabularAttributionMonitor(["a"], method="grad_cam")
    with pytest.raises(MisconfigurationException, match=r"\(N, 2\)"):
        TabularAttributionMonitor(["a", "b"]).check_rows(torch.randn(4, 3))
