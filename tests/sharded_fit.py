"""A fit under ModelParallelStrategy (FSDP2 ``fully_shard``, 2 CPU processes, gloo) or in one process, for
tests/distributed/test_sharded.py. Lightning's ModelParallelStrategy starts the other rank by re-running this script,
so the test runs it as a subprocess: ``python tests/sharded_fit.py <out_dir> <devices>``. One fit holds every case.

Each rank writes ``<out_dir>/rank<r>.json``: the callbacks' metrics after the fit (seconds excluded), their last
explained epochs and error counts, and the number of forward passes of the network on that rank.
"""
import json
import os
import sys
import warnings
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.simplefilter("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from helpers import digits_data, small_cnn  # noqa: E402
from lightning_xai import (AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ProjectionMonitor,  # noqa: E402
                           SampleInfluenceMonitor, ShortcutDiscovery, ShortcutMonitor)
from lightning_xai.shortcuts import ShortcutConfig  # noqa: E402


def _probe(n: int):
    """The first ``n`` validation samples: a fixed probe set (chosen from the data, it would depend on how the
    validation batches are shared out over the ranks)."""
    _, val = digits_data(128, 64)
    return val.tensors[0][:n], val.tensors[1][:n]


CASES = {
    # 7 probe samples: split over the ranks, occlusion and LIME would run unequal numbers of passes
    "attribution": lambda: AttributionMonitor(
        methods=("saliency", ("integrated_gradients", {"steps": 8}), ("occlusion", {"window": 2}),
                 ("lime", {"samples": 16, "grid": (4, 4)}), ("grad_cam", {"layer": "net.0.2"})),
        probe=_probe(7)),
    "probes": lambda: LinearProbeMonitor(layers=["net.0.2", "net.1.3"], untrained_baseline=False),
    "shortcut": lambda: ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe=_probe(19), action="log",
                                        config=ShortcutConfig(num_controls=2, reference_samples=0)),
    "discovery": lambda: ShortcutDiscovery(probe=_probe(19), action="log", prefix="discovery",
                                           config=ShortcutConfig(num_controls=2, reference_samples=0)),
    # an objective on an inner layer of a sharded unit, and one on the logits
    "featvis": lambda: FeatureVisMonitor(targets=[("logits", (0, 1, 2)), ("net.0.2", "channels", (0, 1))],
                                         every_n_epochs=1, steps=4),
    "samples": lambda: SampleInfluenceMonitor(every_n_epochs=1, probe=_probe(5), max_train_samples=64, k=3),
    "projection": lambda: ProjectionMonitor(layers=["net.1.3"], probe=_probe(11), projector=False),
}


class Sharded(L.LightningModule):
    """The tiny digits CNN, each block sharded with FSDP2 when the strategy provides a device mesh."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = small_cnn(batchnorm=False)
        self.forwards = 0

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for block in self.net:
            fully_shard(block, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def forward(self, x):
        self.forwards += 1
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self(batch[0])  # the pass LinearProbeMonitor's hooks read

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the same weights in every run


class Dump(L.Callback):
    def __init__(self, out: str, monitors) -> None:
        self.out, self.monitors = out, monitors

    def on_fit_end(self, trainer, pl_module):
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(("xai/", "discovery/")) and not k.endswith("/seconds")}
        state = {"metrics": metrics, "explained": {m.cost_name(): m.last_explained_epoch for m in self.monitors},
                 "errors": {m.cost_name(): m.errors for m in self.monitors},
                 "forwards": pl_module.forwards, "world": trainer.world_size}
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(state, fh)


def main(out: str, devices: int) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    monitors = [make() for make in CASES.values()]
    for monitor in monitors:
        monitor.on_error = "raise"  # a failure must show, not be skipped
        # a sharded model keeps its layout; so must the one-process reference (z-scores magnify float rounding)
        monitor.channels_last = False
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                     timeout=timedelta(seconds=60)) if devices > 1 else "auto"
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                        callbacks=[*monitors, Dump(out, monitors)], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    train, val = digits_data(128, 64)
    trainer.fit(Sharded(), DataLoader(train, batch_size=32), DataLoader(val, batch_size=16))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]))
