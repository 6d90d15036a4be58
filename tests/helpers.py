"""Test helpers shared by all test modules: tiny models, seeded data and a hygiene snapshot.

The suite's test modules live in one folder per area (``tests/attribution/``, ``tests/callbacks/``, ...);
``conftest.py`` puts this folder on ``sys.path``, so every one of them imports ``helpers`` (and the root conftest's
fixtures apply).
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch
from torch import nn

TESTS = os.path.dirname(os.path.abspath(__file__))  # this folder: helpers, conftest.py and sharded_fit.py
ROOT = os.path.dirname(TESTS)  # the repository (examples/, README.md)


def small_cnn(num_classes: int = 10, in_channels: int = 1, batchnorm: bool = True,
              dropout: float = 0.0) -> nn.Sequential:
    """A tiny CNN for 8x8 (digits) or larger images, with named layers ``features.*`` and ``head``."""
    layers = [nn.Conv2d(in_channels, 8, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()]
    head = [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU()]
    if dropout:
        head.append(nn.Dropout(dropout))
    head.append(nn.Linear(32, num_classes))
    return nn.Sequential(nn.Sequential(*layers), nn.Sequential(*head))


class TinyTextNet(nn.Module):
    """Mean-pooled token embeddings -> 2 logits, over the synthetic spurious-token vocabulary."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        from lightning_xai.text.synthetic import VOCAB

        self.embedding = nn.Embedding(len(VOCAB), dim)
        self.head = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, ids):
        return self.head(self.embedding(ids).mean(1))


def hook_count(model: nn.Module) -> int:
    """Number of hooks of every kind registered anywhere on ``model``."""
    total = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            total += len(getattr(m, attr, {}))
    for p in model.parameters():
        total += len(getattr(p, "_backward_hooks", None) or {})
    return total


def snapshot(model: nn.Module) -> Dict[str, Any]:
    """Everything a side-effect-free call must leave unchanged."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": hook_count(model),
        "rng": torch.get_rng_state().clone(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_unchanged(before: Dict[str, Any], model: nn.Module) -> None:
    """Assert ``model`` and the process are in the state ``before`` recorded (bit for bit)."""
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), f"state entry {k} changed"
    for g0, g1 in zip(before["grads"], after["grads"]):
        assert (g0 is None) == (g1 is None), "param.grad was created or cleared"
        if g0 is not None:
            assert torch.equal(g0, g1), "param.grad changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad flags changed"
    assert before["training"] == after["training"], "train/eval flags changed"
    assert before["hooks"] == after["hooks"], "hooks left behind"
    assert torch.equal(before["rng"], after["rng"]), "global RNG state changed"
    assert before["grad_enabled"] == after["grad_enabled"], "grad mode changed"


# --------------------------------------------------------------------------- Lightning fixtures
import pytorch_lightning as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


#: The two Lightning packages every callback supports; integration tests parametrise over them.
PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def lightning_package(name: str = "pytorch_lightning"):
    """``lightning.pytorch`` or ``pytorch_lightning`` (the module), skipping the test when it is not installed."""
    import importlib

    import pytest

    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - CI installs both
        pytest.skip(f"{name} is not installed")


class ClassifierSteps:
    """The steps of a tiny classifier (default: :func:`small_cnn`); mixed into either package's LightningModule."""

    def __init__(self, net: nn.Module = None, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = net if net is not None else small_cnn()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsModule(ClassifierSteps, pl.LightningModule):
    """A tiny classifier ``pytorch_lightning.LightningModule`` for integration tests."""


_MODULES = {"pytorch_lightning": DigitsModule}


def classifier(package: str = "pytorch_lightning", net: nn.Module = None, lr: float = 1e-2):
    """A :class:`ClassifierSteps` module built on ``package``'s LightningModule (a Trainer takes only its own)."""
    if package not in _MODULES:
        base = lightning_package(package).LightningModule
        _MODULES[package] = type("DigitsModule", (ClassifierSteps, base), {"__doc__": DigitsModule.__doc__})
    return _MODULES[package](net, lr=lr)


def digits_data(n_train: int = 256, n_val: int = 64):
    """(train, val) TensorDatasets of 8x8 digits in [0, 1]."""
    from lightning_xai.datasets import load_digits_tensors

    x, y = load_digits_tensors()
    val = slice(n_train, n_train + n_val)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[val], y[val])


def digits_loaders(n_train: int = 256, n_val: int = 64, batch_size: int = 32):
    """Train (shuffled) and validation loaders over :func:`digits_data`."""
    train, val = digits_data(n_train, n_val)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size)


class ReleaseProcessGroup(pl.Callback):
    """Destroys the default process group when a spawned DDP worker's fit ends (Lightning leaves a gloo group alive).

    A gloo group left alive at interpreter exit can be freeing finished work on its worker thread while Python
    finalises, which aborts the worker (SIGABRT, "terminate called without an active exception") after the fit has
    ended: about one ddp_spawn fit in ten here. ``teardown`` is the last hook; nothing gathers after it.
    """

    def teardown(self, trainer, pl_module, stage):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def tiny_trainer(tmp_path, callbacks=(), logger=True, package: str = "pytorch_lightning", **kwargs):
    """A fast CPU Trainer of ``package`` writing under ``tmp_path`` (TensorBoard logger unless ``logger`` is given).

    With more than one device, a last callback releases the process group in each worker (``ReleaseProcessGroup``).
    """
    lightning = lightning_package(package)
    if logger is True:
        logger = lightning.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    opts = dict(default_root_dir=str(tmp_path), max_epochs=2, accelerator="cpu", devices=1, logger=logger,
                callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, num_sanity_val_steps=0, deterministic=True)
    opts.update(kwargs)
    if opts["devices"] != 1:
        opts["callbacks"] = opts["callbacks"] + [ReleaseProcessGroup()]
    return lightning.Trainer(**opts)


def read_events(log_dir: str):
    """An EventAccumulator over every event file under ``log_dir`` (images and text kept in full)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def is_timing(tag: str) -> bool:
    """A run's wall time (``<prefix>/<area>/seconds``): logged at the same steps as the figures, never equal twice."""
    return tag.endswith("/seconds")


def trained_weights(module: nn.Module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def read_text(acc, tag: str) -> str:
    """The newest text logged under ``tag`` (TensorBoard stores it as ``<tag>/text_summary``)."""
    name = tag if tag in acc.Tags()["tensors"] else f"{tag}/text_summary"
    return acc.Tensors(name)[-1].tensor_proto.string_val[0].decode()


class FigureSpy:
    """Records the figures a callback module draws (image and :class:`~lightning_xai.render.Layout`), in order, by
    wrapping its render functions with ``monkeypatch`` (``pytest.MonkeyPatch.context()`` in a module fixture)."""

    def __init__(self, monkeypatch, module, *names: str) -> None:
        self.drawn: Dict[str, list] = {name: [] for name in names}
        for name in names:
            def spy(*args, _original=getattr(module, name), _store=self.drawn[name], **kwargs):
                fig = _original(*args, **kwargs)
                _store.append(fig)
                return fig

            monkeypatch.setattr(module, name, spy)

    def __getitem__(self, name: str) -> list:
        return self.drawn[name]

    def titled(self, name: str, start: str) -> list:
        """The figures drawn by ``name`` whose title starts with ``start``."""
        return [f for f in self.drawn[name] if f.layout.text("title")[0].startswith(start)]


def png_equals(encoded: bytes, image: torch.Tensor) -> bool:
    """Whether a logged PNG holds exactly ``image (3, H, W)`` in ``[0, 1]`` (as log_image rounds it)."""
    import io

    import numpy as np
    from PIL import Image

    decoded = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    drawn = (image.permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    return decoded.shape == drawn.shape and bool((decoded == drawn).all())


def colour_images(n: int, seed: int):
    """A TensorDataset of ``n`` images of 3x16x16 in 10 classes, each class a colour under uniform noise (seeded):
    images where channels-last changes the convolutions' layout."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    palette = torch.rand(10, 3, generator=torch.Generator().manual_seed(99)) * 0.7  # a colour per class
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.3 + palette[y].view(n, 3, 1, 1)
    return torch.utils.data.TensorDataset(x, y)


def keep_results(monitor):
    """``monitor.compute``'s results, appended to the returned list at every run."""
    kept, compute = [], monitor.compute

    def spy(*args):
        out = compute(*args)
        kept.append(out)
        return out

    monitor.compute = spy
    return kept
