"""Checkpoint resume for every callback: a run stopped after epoch k and resumed from its checkpoint logs the
same figures as one uninterrupted run.

Each case fits three times on seeded, deterministic data: uninterrupted for ``EPOCHS`` epochs; the same run
stopped (an exception, like a preempted job) at the start of epoch ``STOP + 1``, after the checkpoint of epoch
``STOP`` was written; and a fresh Trainer, model and callback resumed from that checkpoint. The weights must
match first (else the harness is wrong, not the callback); then every ``xai/`` scalar, image and text event of
the stopped and resumed runs together must equal the uninterrupted run's, payload for payload, at the same
steps, and so must the projector files.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import ModelCheckpoint

from helpers import (DigitsModule, TinyTextNet, digits_data, is_timing, read_events, small_cnn, tiny_trainer,
                     trained_weights)
from lightning_xai import (AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ProjectionMonitor,
                           SampleInfluenceMonitor, ShortcutDiscovery, ShortcutMonitor, TabularAttributionMonitor,
                           TokenAttributionMonitor)
from lightning_xai.shortcuts import ShortcutConfig
from lightning_xai.text.synthetic import VOCAB, spurious_token_data

EPOCHS = 4
STOP = 1  # the stopped run's last finished epoch


# --------------------------------------------------------------------------- deterministic data and models
class EpochShuffle(Sampler):
    """A shuffle that depends on the epoch only (Lightning calls ``set_epoch``), not on the global RNG's history,
    so an uninterrupted and a resumed run see the same batches."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def _loaders(train: TensorDataset, val: TensorDataset, batch_size: int = 32) -> Tuple[DataLoader, DataLoader]:
    return (DataLoader(train, batch_size=batch_size, sampler=EpochShuffle(len(train))),
            DataLoader(val, batch_size=batch_size))


def _digits():
    return DigitsModule(small_cnn()), *_loaders(*digits_data(192, 48))


def _text():
    train = TensorDataset(*spurious_token_data(128).tensors())
    val = TensorDataset(*spurious_token_data(32, shortcut="random", seed=1).tensors())
    return DigitsModule(TinyTextNet(), lr=0.02), *_loaders(train, val)


FEATURES = ["a", "b", "c", "d", "e"]


def _tabular_set(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(FEATURES), generator=gen)
    return TensorDataset(x, (x[:, 1] - 0.5 * x[:, 3] > 0).long())


def _tabular():
    net = nn.Sequential(nn.Linear(len(FEATURES), 16), nn.ReLU(), nn.Linear(16, 2))
    return DigitsModule(net, lr=0.05), *_loaders(_tabular_set(128, 0), _tabular_set(32, 1))


def _noise_tunnel():
    from captum.attr import NoiseTunnel, Saliency

    return NoiseTunnel(Saliency(lambda x: x)), {"nt_type": "smoothgrad", "nt_samples": 4, "stdevs": 0.2}


# --------------------------------------------------------------------------- the cases
# every randomised method is in here: SmoothGrad noise, LIME masks, a uniform IG baseline, featvis starts and
# transforms, random projections, control-label permutations, control regions, k-means (SpRAy)
CASES: Dict[str, Tuple[Callable[[], Callback], Callable[[], tuple]]] = {
    "attribution": (lambda: AttributionMonitor(
        methods=("saliency", ("smoothgrad", {"samples": 4}),
                 ("integrated_gradients", {"steps": 4, "baseline": "uniform"}),
                 ("lime", {"samples": 16, "grid": (4, 4)}), ("grad_cam", {"layer": "net.0.3"})),
        probe_samples=6, on_error="raise"), _digits),
    # the global RNG (Captum's NoiseTunnel) and a user's generator, whose states a resumed run does not have
    "attribution-rng": (lambda: AttributionMonitor(
        methods=(_noise_tunnel(), ("smoothgrad", {"samples": 4, "generator": torch.Generator().manual_seed(3)})),
        probe_samples=6, on_error="raise"), _digits),
    "attribution-every-2": (lambda: AttributionMonitor(methods=(("smoothgrad", {"samples": 4}),), probe_samples=6,
                                                       every_n_epochs=2, on_error="raise"), _digits),
    "probes": (lambda: LinearProbeMonitor(layers=["net.0.3", "net.1.3"], reduce={"net.0.3": ("rproj", 32),
                                                                                 "net.1.3": "auto"},
                                          on_error="raise"), _digits),
    "probes-every-2": (lambda: LinearProbeMonitor(layers=["net.1.*"], every_n_epochs=2, on_error="raise"), _digits),
    "featvis": (lambda: FeatureVisMonitor(targets=[("logits", (0, 1, 2)), ("net.0.3", "channels", (0, 1))],
                                          every_n_epochs=1, steps=6, min_side=8, on_error="raise"), _digits),
    "shortcut": (lambda: ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, config=ShortcutConfig(num_controls=2),
                                         probe_samples=20, action="log", on_error="raise"), _digits),
    "discovery": (lambda: ShortcutDiscovery(config=ShortcutConfig(num_controls=2), probe_samples=20, action="log",
                                            on_error="raise"), _digits),
    "samples": (lambda: SampleInfluenceMonitor(every_n_epochs=1, probe_samples=4, k=3, support_k=3, num_representers=2,
                                               num_suspects=4, num_sparse=2, max_train_samples=64, on_error="raise"),
                _digits),
    "projection": (lambda: ProjectionMonitor(layers=["net.0.3", "net.1.3"], reduce="auto", probe_samples=12,
                                             thumbnail_size=8, on_error="raise"), _digits),
    "text": (lambda: TokenAttributionMonitor("net.embedding", vocab=list(VOCAB), watch_tokens=["zz"],
                                             method="smoothgrad", options={"samples": 4}, probe_samples=6,
                                             on_error="raise"), _text),
    "text-ig": (lambda: TokenAttributionMonitor("net.embedding", vocab=list(VOCAB), options={"steps": 4},
                                                probe_samples=6, on_error="raise"), _text),
    "tabular": (lambda: TabularAttributionMonitor(FEATURES, method=("smoothgrad", {"samples": 4}), probe_samples=16,
                                                  on_error="raise"), _tabular),
}


class _Preempted(Exception):
    pass


class _Preempt(Callback):
    """Stops the run like a killed job: at the start of epoch ``at``, after the previous epoch's checkpoint."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at:
            raise _Preempted()


def _fit(tmp_path, name: str, case: str, extra=(), ckpt_path=None):
    pl.seed_everything(0, workers=True)
    make_callback, make_data = CASES[case]
    module, train, val = make_data()
    callback = make_callback()
    trainer = tiny_trainer(tmp_path / name, callbacks=[callback, *extra], max_epochs=EPOCHS,
                           enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra))
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return module, callback, trainer


def _figures(log_dir) -> Dict[Tuple[str, str, int], Any]:
    """Every ``xai/`` event under ``log_dir`` keyed by (kind, tag, step), plus the projector files and config.

    Raises AssertionError if a key occurs twice (an epoch logged twice across the stop).
    """
    acc = read_events(log_dir)
    tags = acc.Tags()
    items = []
    for tag in tags["scalars"]:
        items += [(("scalar", tag, ev.step), ev.value) for ev in acc.Scalars(tag)]
    for tag in tags["images"]:
        items += [(("image", tag, ev.step), ev.encoded_image_string) for ev in acc.Images(tag)]
    for tag in tags["tensors"]:
        items += [(("text", tag, ev.step), ev.tensor_proto.SerializeToString()) for ev in acc.Tensors(tag)]
    items = [(key, value) for key, value in items if key[1].startswith("xai/")]
    for root, _, files in os.walk(log_dir):
        rel = os.path.relpath(root, log_dir)
        for name in files:
            if rel != "." and name in ("tensors.tsv", "metadata.tsv", "sprite.png"):  # <step>/<tag>/<file>
                with open(os.path.join(root, name), "rb") as fh:
                    items.append((("projector", os.path.join(rel, name), int(rel.split(os.sep)[0])), fh.read()))
    config = os.path.join(str(log_dir), "projector_config.pbtxt")
    if os.path.exists(config):  # what TensorBoard's projector tab lists
        from google.protobuf import text_format
        from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

        with open(config) as fh:
            parsed = text_format.Parse(fh.read(), ProjectorConfig())
        items += [(("projector_config", e.tensor_name, 0), e.SerializeToString()) for e in parsed.embeddings]
    keys = [key for key, _ in items]
    assert len(set(keys)) == len(keys), f"logged twice: {sorted(k for k in set(keys) if keys.count(k) > 1)[:5]}"
    return dict(items)


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in CASES])
def test_stopped_and_resumed_run_logs_the_same_figures(tmp_path, case):
    whole, whole_cb, _ = _fit(tmp_path, "whole", case)

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    with pytest.raises(_Preempted):
        _fit(tmp_path, "stopped", case, extra=[ckpt, _Preempt(STOP + 1)])
    log_dir = tmp_path / "stopped" / "tb" / "version_0"
    before = _figures(log_dir)
    # a new Trainer, model and callback, logging into the same TensorBoard run, as a user resuming a job would
    resumed, resumed_cb, _ = _fit(tmp_path, "stopped", case, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    # the harness first: same weights, so any difference below comes from the callback
    a, b = trained_weights(whole), trained_weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ after resume: {k}"

    expected = _figures(tmp_path / "whole" / "tb" / "version_0")
    got = _figures(log_dir)
    assert expected, "the uninterrupted run logged nothing"
    assert before and len(before) < len(got), "each part of the interrupted run logs something"
    assert sorted(got) == sorted(expected)
    # the same epochs explained (the keys, `seconds` included); the same figures (all but the wall times)

    def same(a, b):  # NaN (a figure without data, e.g. no control place) equals NaN
        return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)

    differ = sorted(key for key in expected if not same(got[key], expected[key]) and not is_timing(key[1]))
    assert not differ, f"figures differ after resume: {differ[:10]}"
    assert resumed_cb.last_explained_epoch == whole_cb.last_explained_epoch
