"""The overhead budget: callbacks of one Trainer together keep explaining within ``max_overhead`` of training."""
import time
import warnings

import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from helpers import DigitsModule, digits_loaders, tiny_trainer, trained_weights
from lightning_xai import AttributionMonitor, LinearProbeMonitor, ShortcutMonitor
from lightning_xai.callbacks import budget


def slow_forward(seconds):
    """A ``forward`` that makes each explanation expensive compared with the tiny model's training."""
    def forward(module, x):
        time.sleep(seconds)
        return module(x)
    return forward


def test_ledger_allows_a_run_only_within_the_budget():
    book = budget.Ledger(start=0.0)
    assert book.allows(1, 0.1, now=0.0)  # nothing spent, no known cost: the first run may go
    book.begin(1, epoch=0)
    book.charge(1, 0.5)
    assert book.training_seconds(now=2.5) == pytest.approx(2.0)
    assert not book.allows(1, 0.1, now=2.5)  # 0.5 spent + 0.5 expected > 0.1 * 2.0
    assert book.allows(1, 0.1, now=10.5)  # 1.0 <= 0.1 * 10.0
    assert not book.allows(2, 0.1, now=10.0)  # an unknown cost is taken as the others' mean: 0.5 + 0.5 > 0.95
    assert book.allows(2, 0.1, now=10.5)  # 1.0 <= 1.0
    book.begin(1, epoch=3)  # a new run measures its cost afresh
    book.charge(1, 0.2)
    book.charge(1, 0.1)
    assert book.cost[1] == pytest.approx(0.3) and book.spent == pytest.approx(0.8)
    assert book.runs[1] == [0, 3]
    fresh = budget.Ledger(start=0.0)
    fresh.begin(1, epoch=0)  # callback 1 is mid-run at epoch 0, its cost not charged yet
    assert not fresh.allows(2, 0.1, epoch=0, now=1.0)  # so an unknown-cost callback waits ...
    assert fresh.allows(2, 0.1, epoch=1, now=1.0)  # ... until the next epoch
    assert fresh.allows(1, 0.1, epoch=0, now=1.0)  # a known cost (0 so far) is just checked against the budget


def test_callbacks_take_turns_whatever_their_order():
    book = budget.Ledger(start=0.0)
    for key, cost in ((1, 0.1), (2, 0.1)):  # both ran once, at epoch 0
        book.begin(key, epoch=0)
        book.charge(key, cost)
    book.begin(1, epoch=1)  # callback 1 ran again at epoch 1; callback 2 was skipped there
    book.charge(1, 0.1)
    book.skipped[2] = [1]
    # at 10 s of training 0.3 + 0.1 fits the budget of 1.0: callback 1 (2 runs) yields to callback 2 (1 run, waiting)
    assert not book.allows(1, 0.1, epoch=2, now=10.3)
    assert book.allows(2, 0.1, epoch=2, now=10.3)
    book.begin(2, epoch=2)
    book.charge(2, 0.1)
    assert book.allows(1, 0.1, epoch=3, now=10.4)  # its turn again
    book.begin(1, epoch=3)
    book.charge(1, 0.1)  # 3 runs against 2; spent 0.5
    # a waiting callback that does not fit now still has the budget saved up for it ...
    book.skipped[2].append(4)
    book.cost[2] = 0.8  # 0.5 spent + 0.8 > 1.0 now, but 0.8 <= 1.0: callback 1 yields, and 2 waits too
    assert not book.allows(1, 0.1, epoch=5, now=10.5) and not book.allows(2, 0.1, epoch=5, now=10.5)
    assert book.allows(2, 0.1, epoch=6, now=13.5)  # 0.5 + 0.8 <= 0.1 * 13.0
    # ... but one that costs more than the whole budget of the training so far blocks nobody
    book.cost[2] = 5.0
    assert book.allows(1, 0.1, epoch=5, now=10.5) and not book.allows(2, 0.1, epoch=5, now=10.5)


def test_a_first_run_is_priced_from_its_declared_work_and_the_training_speed():
    book = budget.Ledger(start=0.0)
    book.work[1] = 400.0  # sample passes of one run
    assert book.expected_cost(1, now=2.0) == 0.0  # no training samples counted yet, nobody ran: nothing known
    book.count_rows(7, 64)  # callback 7 counts; the others' counts are ignored
    book.count_rows(8, 64)
    book.count_rows(7, 36)
    assert book.rows == 100 and book.counter == 7
    assert book.expected_cost(1, now=2.0) == pytest.approx(400 * 2.0 / 100)  # 8 s: 0.02 s per training sample
    assert not book.allows(1, 0.1, epoch=0, now=2.0)  # 8 s > 0.1 * 2 s
    assert not book.allows(1, 0.1, epoch=0, now=80.0)  # 400 * 80 / 100 = 320 s > 8 s: still no ...
    book.count_rows(7, 10000 - 100)  # ... until the samples trained make a sample pass cheap
    assert book.allows(1, 0.1, epoch=0, now=80.0)  # 400 * 80 / 10000 = 3.2 s <= 8 s
    book.count_rows(7, None)  # a batch it cannot read: the count is unknown from then on
    assert book.rows is None and book.expected_cost(1, now=80.0) == 0.0


def test_max_overhead_values_and_the_environment_default(monkeypatch):
    for bad in (0, -0.1, "lots", True):
        with pytest.raises(MisconfigurationException, match="max_overhead"):
            AttributionMonitor(max_overhead=bad)
    assert AttributionMonitor(max_overhead=0.25).max_overhead == 0.25
    assert AttributionMonitor(max_overhead=None).max_overhead is None
    monkeypatch.delenv(budget.ENV, raising=False)
    assert AttributionMonitor().max_overhead == budget.DEFAULT_MAX_OVERHEAD == 0.1
    monkeypatch.setenv(budget.ENV, "0.3")
    assert AttributionMonitor().max_overhead == 0.3
    monkeypatch.setenv(budget.ENV, "None")
    assert AttributionMonitor().max_overhead is None
    monkeypatch.setenv(budget.ENV, "ten percent")
    with pytest.raises(MisconfigurationException, match="LIGHTNING_XAI_MAX_OVERHEAD"):
        AttributionMonitor()


def _fit(tmp_path, callbacks, epochs=4):
    torch.manual_seed(0)
    model = DigitsModule()
    trainer = tiny_trainer(tmp_path, callbacks=callbacks, max_epochs=epochs, logger=False)
    train, val = digits_loaders(n_train=128, n_val=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train, val)
    return model, trainer, [str(w.message) for w in caught]


def test_an_expensive_callback_is_skipped_to_stay_in_budget_and_shares_it(tmp_path):
    # each explanation sleeps 2 x 0.25 s (prediction + saliency), while 4 epochs of training take well under 2.5 s:
    # the first run is allowed (nothing spent yet), every later one would exceed 10 % of the training time.
    slow = AttributionMonitor(methods="saliency", probe_samples=4, forward=slow_forward(0.25), max_overhead=0.1)
    cheap = AttributionMonitor(methods="saliency", probe_samples=64, max_overhead=0.1, prefix="cheap")
    model, trainer, messages = _fit(tmp_path, [slow, cheap])
    book = budget.ledger(trainer)
    assert book.runs[id(slow)] == [0]
    assert book.skipped[id(slow)] == [1, 2, 3]
    assert 0 in book.skipped[id(cheap)]  # the budget is shared: the slow run at epoch 0 left nothing for the cheap one
    # a skipped callback still fixed its probe set after the first validation epoch: the 32 validation samples once
    # each (had it kept collecting while skipped, epoch 1 would have added the same 32 again), nothing left pending
    _, val = digits_loaders(n_train=128, n_val=32)
    assert torch.equal(cheap.probe_x.sort(0).values, torch.cat([x for x, _ in val]).sort(0).values)
    assert cheap.probe_x.unique(dim=0).shape[0] == 32 and cheap._candidates == {}
    assert book.spent >= 0.5 and book.finished
    summary = [m for m in messages if "overhead budget" in m]
    assert len(summary) == 1 and "explained 1 of 4 scheduled epochs" in summary[0] and "max_overhead=None" in summary[0]
    assert slow.last_explained_epoch == 0


def test_an_expensive_first_run_waits_for_its_price(tmp_path):
    # IG with 64 steps on 16 probe samples is ~1000 sample passes; an epoch trains 128 samples: 10 % of the
    # training time never pays for it in 3 epochs, so it never runs, where a first run used to be let through
    costly = AttributionMonitor(methods=(("integrated_gradients", {"steps": 64}),), probe_samples=16, max_overhead=0.1)
    assert costly.estimated_work() == pytest.approx(16 * (1 / 3 + 64 + 2 / 3))
    shortcut = ShortcutMonitor(regions={"mark": "top_left", "frame": "border"}, num_controls=4, probe_samples=10,
                               reference_samples=0)
    assert shortcut.estimated_work() == pytest.approx(10 * (1 / 3 + 1 + 2 * 5 / 3))  # saliency, 2 x (region + 4 controls)
    drawn = ShortcutMonitor(regions={"mark": "top_left", "frame": "border"}, num_controls=4, probe_samples=10)
    assert drawn.estimated_work() == pytest.approx(10 * (1 / 3 + 1 + 2 * 4 * 5 / 3))  # 4 donor draws by default
    assert ShortcutMonitor(regions="border", method=lambda model, x, target: x).estimated_work() is None  # a callable

    class Unpriced(AttributionMonitor):
        def estimated_work(self, trainer=None):
            return None

    unpriced = Unpriced(methods=(("integrated_gradients", {"steps": 64}),), probe_samples=16, max_overhead=0.1)
    _, trainer, _ = _fit(tmp_path / "a", [costly], epochs=3)
    book = budget.ledger(trainer)
    assert book.runs.get(id(costly), []) == [] and book.skipped[id(costly)] == [0, 1, 2]
    assert book.rows == 3 * 128 and costly.last_explained_epoch == -2
    # the probes' work is per validation sample: the untrained copy's forward, and capturing/fitting
    assert LinearProbeMonitor(layers=["net.1"]).estimated_work(trainer) == pytest.approx(32 * 2 / 3)
    assert LinearProbeMonitor(layers=["net.1"], untrained_baseline=False).estimated_work(trainer) == pytest.approx(32 / 3)
    assert LinearProbeMonitor(layers=["net.1"]).estimated_work(None) is None
    _, trainer, _ = _fit(tmp_path / "b", [unpriced], epochs=3)
    assert budget.ledger(trainer).runs[id(unpriced)][0] == 0


def test_the_budget_never_changes_training(tmp_path):
    budgeted, _, _ = _fit(tmp_path / "a", [AttributionMonitor(methods="saliency", probe_samples=4, max_overhead=0.01),
                                           LinearProbeMonitor(layers=["net.1"], max_overhead=0.01)])
    plain, _, _ = _fit(tmp_path / "b", [])
    after, before = trained_weights(budgeted), trained_weights(plain)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name


def test_without_a_budget_every_epoch_is_explained(tmp_path):
    slow = AttributionMonitor(methods="saliency", probe_samples=4, forward=slow_forward(0.05), max_overhead=None)
    probes = LinearProbeMonitor(layers=["net.1"], max_overhead=None)
    _, trainer, messages = _fit(tmp_path, [slow, probes], epochs=3)
    book = budget.ledger(trainer)
    assert book.runs[id(slow)] == [0, 1, 2] and book.runs[id(probes)] == [0, 1, 2]
    assert not book.skipped and not [m for m in messages if "overhead budget" in m]
    assert book.cost[id(slow)] >= 0.1  # the runs were still measured


def test_validate_is_never_skipped(tmp_path):
    monitor = AttributionMonitor(methods="saliency", probe_samples=4, max_overhead=1e-9)
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], logger=False)
    _, val = digits_loaders(n_train=32, n_val=16)
    trainer.validate(DigitsModule(), val)
    assert monitor.last_explained_epoch == 0


def test_scalars_are_monitorable_and_logged_at_lightnings_step(tmp_path):
    """During fit the scalars skip `pl_module.log` (see XAICallback.log_metrics) but stay monitorable."""
    from pytorch_lightning.callbacks import EarlyStopping

    from helpers import read_events

    tag = "xai/attribution/saliency/top5_share"
    monitor = AttributionMonitor(methods="saliency", probe_samples=4, max_overhead=None)
    # mode="max" with an impossible min_delta: no improvement after the first epoch, so patience 1 stops at epoch 1
    stopper = EarlyStopping(monitor=tag, mode="max", patience=1, min_delta=10.0)
    trainer = tiny_trainer(tmp_path, callbacks=[monitor, stopper], max_epochs=5)
    train, val = digits_loaders(n_train=64, n_val=16)
    trainer.fit(DigitsModule(), train, val)
    assert trainer.current_epoch == 2 and stopper.stopped_epoch == 1  # EarlyStopping saw the value every epoch
    acc = read_events(trainer.logger.log_dir)
    logged = acc.Scalars(tag)
    assert [e.step for e in logged] == [e.step for e in acc.Scalars("val_acc")]  # same steps as Lightning's own
    assert len(logged) == 2 and float(trainer.callback_metrics[tag]) == pytest.approx(logged[-1].value)
    assert 0 < logged[0].value <= 1
