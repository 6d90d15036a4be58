"""Binary classifiers with one logit per sample (BCEWithLogitsLoss): the callbacks read them as two classes."""
from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_xai as lx
from helpers import read_events, small_cnn, tiny_trainer
from lightning_xai._utils import class_probs, two_class_logits
from lightning_xai.datasets import load_digits_tensors
from lightning_xai.shortcuts import check_region


@pytest.mark.parametrize("shape", [(5,), (5, 1)])
def test_two_class_logits_match_the_sigmoid(shape):
    z = torch.linspace(-3, 4, 5).view(shape)
    logits = two_class_logits(z)
    assert logits.shape == (5, 2)
    p = class_probs(z)
    torch.testing.assert_close(p[:, 1], torch.sigmoid(z.view(-1)))
    torch.testing.assert_close(p[:, 0], 1 - torch.sigmoid(z.view(-1)))
    assert torch.equal(logits.argmax(1), (z.view(-1) > 0).long())
    torch.testing.assert_close(logits[:, 1] - logits[:, 0], z.view(-1))  # the log-odds are z itself


def test_multiclass_logits_pass_through():
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(two_class_logits(z), z)
    torch.testing.assert_close(class_probs(z), z.softmax(1))


class CornerLogit(nn.Module):
    """One logit: large where the top-left 2x2 corner is bright, blind to everything else."""

    def forward(self, x):
        return 12.0 * (x[:, :, :2, :2].mean((1, 2, 3)) - 0.5).unsqueeze(1)


def test_the_shortcut_test_reads_a_single_logit_model_as_two_classes():
    # a softmax over one logit is always 1: the model's log-odds must be read as two classes for any pull to show
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g)
    y = (torch.arange(64) % 2)
    x[:, :, :2, :2] = (0.2 + 0.6 * y.float()).view(-1, 1, 1, 1)  # the mark codes the class
    verdict = check_region(CornerLogit(), x, y, None, None, (0, 0, 2, 2))
    assert verdict.alarm and verdict.stats["flip"] > 0.9 and verdict.stats["pull"] > 1
    assert verdict.stats["control_pull"] == 0.0  # places outside the corner do nothing


class BinaryModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = small_cnn(1, batchnorm=False)

    def forward(self, x):
        return self.net(x)  # (N, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x).squeeze(1), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _binary_shortcut_loaders():
    x, _ = load_digits_tensors()
    # float labels, as BCE wants them, unrelated to the digit: only the corner mark, bright on the positives in
    # training and validation, tells the classes apart
    y = (torch.rand(x.shape[0], generator=torch.Generator().manual_seed(0)) < 0.5).float()
    x = x.clone()
    x[:, :, :2, :2] = 0.0
    x[y == 1, :, :2, :2] = 1.0
    train = TensorDataset(x[:600], y[:600])
    val = TensorDataset(x[600:900], y[600:900])
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=100)


def test_callbacks_explain_a_bce_model_and_catch_its_shortcut(tmp_path):
    pl.seed_everything(0)
    train, val = _binary_shortcut_loaders()
    shortcut = lx.ShortcutMonitor(regions={"mark": (0, 0, 2, 2)}, action="log", probe_samples=64)
    attribution = lx.AttributionMonitor(methods=["saliency"], target="label", probe_samples=8)
    trainer = tiny_trainer(tmp_path, callbacks=[shortcut, attribution], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(BinaryModule(), train, val)
    failures = [str(w.message) for w in caught if "failed while" in str(w.message)]
    assert not failures, failures
    assert set(shortcut.probe_y.unique().tolist()) == {0, 1}  # float labels became the classes 0 and 1
    metrics = trainer.callback_metrics
    assert float(metrics["xai/shortcut/mark/alarm"]) == 1.0
    assert float(metrics["xai/shortcut/mark/pull"]) > 0.3
    events = read_events(tmp_path / "tb" / "version_0")
    assert any(tag.startswith("xai/attribution/") for tag in events.Tags()["images"])
