"""Out of the box: every callback, built with its default options, explains every epoch its cadence schedules,
under both Lightning packages, reports each run's cost, and prints the end-of-fit cost table."""
from __future__ import annotations

import io
import logging
from typing import Callable, Dict, Tuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import (PACKAGES, TinyTextNet, classifier, digits_data, lightning_package, read_events, small_cnn,
                     tiny_trainer)
from lightning_xai import (AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ProjectionMonitor,
                           SampleInfluenceMonitor, ShortcutDiscovery, ShortcutMonitor, TabularAttributionMonitor,
                           TokenAttributionMonitor)
from lightning_xai.callbacks import _cost as cost
from lightning_xai.text.synthetic import VOCAB, spurious_token_data

EPOCHS = 3
FEATURES = ["a", "b", "c", "d", "e"]


def _digits(package: str):
    train, val = digits_data(256, 64)
    return (classifier(package, small_cnn()), DataLoader(train, batch_size=64, shuffle=True),
            DataLoader(val, batch_size=32))


def _text(package: str):
    train = TensorDataset(*spurious_token_data(128).tensors())
    val = TensorDataset(*spurious_token_data(32, shortcut="random", seed=1).tensors())
    return classifier(package, TinyTextNet(), lr=0.02), DataLoader(train, batch_size=32), DataLoader(val, batch_size=32)


def _tabular(package: str):
    def make(n: int, seed: int) -> TensorDataset:
        x = torch.randn(n, len(FEATURES), generator=torch.Generator().manual_seed(seed))
        return TensorDataset(x, (x[:, 1] - 0.5 * x[:, 3] > 0).long())

    net = nn.Sequential(nn.Linear(len(FEATURES), 16), nn.ReLU(), nn.Linear(16, 2))
    train, val = DataLoader(make(128, 0), batch_size=32), DataLoader(make(32, 1), batch_size=32)
    return classifier(package, net, lr=0.05), train, val


# only the arguments a callback cannot do without; everything else at its default
DEFAULTS: Dict[str, Tuple[Callable[[], object], Callable[[str], tuple]]] = {
    "attribution": (lambda: AttributionMonitor(), _digits),
    "probes": (lambda: LinearProbeMonitor(layers=["net.0.*", "net.1.3"]), _digits),
    "projection": (lambda: ProjectionMonitor(layers=["net.1.3"]), _digits),
    "featvis": (lambda: FeatureVisMonitor(), _digits),
    "samples": (lambda: SampleInfluenceMonitor(), _digits),
    "shortcut": (lambda: ShortcutMonitor(regions="top_left"), _digits),
    "discovery": (lambda: ShortcutDiscovery(), _digits),
    "text": (lambda: TokenAttributionMonitor("net.embedding", vocab=list(VOCAB)), _text),
    "tabular": (lambda: TabularAttributionMonitor(FEATURES), _tabular),
}


def _scheduled(every_n_epochs: int, epochs: int) -> list:
    """The epochs a default callback explains: the cadence's, plus the last one (explained at fit end)."""
    return sorted({e for e in range(epochs) if e % every_n_epochs == 0} | {epochs - 1})


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.parametrize("case", list(DEFAULTS))
def test_default_options_explain_every_scheduled_epoch(tmp_path, case, package):
    make_callback, make_data = DEFAULTS[case]
    callback = make_callback()
    module, train, val = make_data(package)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    logging.getLogger("lightning_xai").addHandler(handler)
    try:
        trainer = tiny_trainer(tmp_path, callbacks=[callback], max_epochs=EPOCHS, package=package)
        trainer.fit(module, train, val)
    finally:
        logging.getLogger("lightning_xai").removeHandler(handler)
    assert type(trainer).__module__.startswith(package.split(".")[0])

    # one wall-time scalar per run, at the steps of the scheduled epochs' validation
    acc = read_events(tmp_path / "tb" / "version_0")
    seconds = acc.Scalars(callback.tag("seconds"))
    epoch_steps = [(e + 1) * len(train) for e in range(EPOCHS)]  # trainer.global_step at each validation
    expected = _scheduled(callback.every_n_epochs, EPOCHS)
    assert [ev.step for ev in seconds] == [epoch_steps[e] for e in expected]
    assert all(ev.value > 0 for ev in seconds)
    # and a figure at each of them: the callback's own tags, besides the wall time
    figures = [t for kind in ("images", "scalars", "tensors") for t in acc.Tags()[kind]
               if t.startswith(callback.tag()) and not t.endswith("/seconds")]
    assert figures, f"{case} logged nothing but its wall time"
    steps = set()
    for tag in figures:
        read = acc.Images if tag in acc.Tags()["images"] else acc.Scalars if tag in acc.Tags()[
                                             "scalars"] else acc.Tensors
        steps |= {ev.step for ev in read(tag)}
    assert steps == {epoch_steps[e] for e in expected}
    assert callback.last_explained_epoch == EPOCHS - 1

    # the end-of-fit cost table: one row for the callback with its runs
    name, runs, secs, share = cost.book(trainer).rows()[0]
    assert (name, runs) == (type(callback).__name__, len(expected))
    assert secs >= sum(ev.value for ev in seconds) * 0.99 and 0 < share < 1
    printed = lines.getvalue()
    assert "time spent explaining" in printed and type(callback).__name__ in printed
    row = next(line for line in printed.splitlines() if line.startswith(type(callback).__name__))
    assert row.split()[1] == str(len(expected))


def test_cadence_follows_validation_epochs_and_the_cost_table_totals(tmp_path):
    """With validation every other epoch (epochs 1, 3, 5), ``every_n_epochs=2`` explains the 1st and 3rd validation
    epochs; a second callback adds a row and a total to the table."""
    train, val = digits_data(128, 32)
    every_2 = AttributionMonitor(methods="saliency", probe_samples=4, every_n_epochs=2, run_on_fit_end=False)
    every_1 = AttributionMonitor(methods="saliency", probe_samples=4, prefix="all")
    trainer = tiny_trainer(tmp_path, callbacks=[every_2, every_1], max_epochs=6, check_val_every_n_epoch=2)
    trainer.fit(classifier(), DataLoader(train, batch_size=64), DataLoader(val, batch_size=32))
    acc = read_events(tmp_path / "tb" / "version_0")
    epoch_steps = [(e + 1) * 2 for e in (1, 3, 5)]  # validation ran after epochs 1, 3 and 5, two batches each
    assert [ev.step for ev in acc.Scalars("xai/attribution/seconds")] == [epoch_steps[0], epoch_steps[2]]
    assert [ev.step for ev in acc.Scalars("all/attribution/seconds")] == epoch_steps
    table = cost.book(trainer).table()
    assert "AttributionMonitor (all)" in table and table.splitlines()[-1].split()[:2] == ["total", "5"]


@pytest.mark.parametrize("package", PACKAGES)
def test_callbacks_are_callbacks_of_either_package_and_their_errors_its_errors(package):
    lightning = lightning_package(package)
    for make_callback, _ in DEFAULTS.values():
        assert isinstance(make_callback(), lightning.Callback)
    with pytest.raises(lightning.utilities.exceptions.MisconfigurationException, match="`prefix`"):
        AttributionMonitor(prefix="")
