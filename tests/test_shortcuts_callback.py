"""ShortcutMonitor in a real Trainer: tags read back from TensorBoard, "stop", do-no-harm, hygiene, resume,
unknown-region mode on a hand-built shortcut model."""
import json
import math
import warnings
from datetime import timedelta

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import (DigitsModule, FigureSpy, assert_unchanged, png_equals, read_events, small_cnn, snapshot, tiny_trainer,
                     trained_weights)
from lightning_xai.callbacks.shortcuts import ShortcutMonitor
from lightning_xai.shortcuts.regions import iou


def corner_set(n=200, seed=0, random_mark=False, texture=0.1):
    """8x8 images: noise up to ``texture``, a top-left 2x2 mark coding the class (or a random class), and a class-coded
    centre blob."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * texture
    y = torch.arange(n) % 5
    level = 0.2 + 0.2 * y.float()
    code = torch.randint(0, 5, (n,), generator=g) if random_mark else y
    x[:, 0, :2, :2] = (0.2 + 0.2 * code.float()).view(-1, 1, 1)
    x[:, 0, 3:5, 3:5] = level.view(-1, 1, 1)
    return x, y


class Reader(nn.Module):
    """Hand-built classifier reading the class from the mean of one 2x2 patch (the corner or the centre)."""

    def __init__(self, corner: bool) -> None:
        super().__init__()
        self.corner = corner
        self.lin = nn.Linear(1, 5)
        with torch.no_grad():  # logits -50 (v - centre_c)^2 expanded: linear in v plus a constant per class
            centres = 0.2 + 0.2 * torch.arange(5).float()
            self.lin.weight.copy_((100 * centres).view(5, 1))
            self.lin.bias.copy_(-50 * centres ** 2)

    def forward(self, x):
        v = x[:, :, :2, :2].mean((1, 2, 3)) if self.corner else x[:, :, 3:5, 3:5].mean((1, 2, 3))
        return self.lin(v.unsqueeze(1))


class FrozenModule(DigitsModule):
    """Trains nothing (lr 0) so the hand-built reader stays as built."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def loaders(n=200, random_mark=False, texture=0.1):
    x, y = corner_set(n, random_mark=random_mark, texture=texture)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=50), DataLoader(ds, batch_size=50)


def test_bad_arguments():
    with pytest.raises(MisconfigurationException, match="action"):
        ShortcutMonitor(regions="border", action="explode")
    with pytest.raises(MisconfigurationException, match="presets"):
        ShortcutMonitor(regions="nowhere")
    with pytest.raises(MisconfigurationException, match="num_controls"):
        ShortcutMonitor(regions="border", num_controls=0)
    with pytest.raises(MisconfigurationException, match="patience"):
        ShortcutMonitor(regions="border", patience=0)
    with pytest.raises(MisconfigurationException, match="donor_draws"):
        ShortcutMonitor(regions="border", donor_draws=0)
    with pytest.raises(MisconfigurationException, match="method"):
        ShortcutMonitor(regions="border", method="nope")


@pytest.mark.parametrize("corner", [True, False], ids=["uses_corner", "ignores_corner"])
def test_known_region_alarm_and_tags(tmp_path, corner, monkeypatch):
    import lightning_xai.callbacks.shortcuts as shortcuts_module

    drawn = FigureSpy(monkeypatch, shortcuts_module, "evidence_figure")["evidence_figure"]
    train, val = loaders()
    monitor = ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=100, action="warn")
    trainer = tiny_trainer(tmp_path, [monitor], max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(FrozenModule(Reader(corner)), train, val)
    shortcut_warnings = [w for w in caught if "looks like a shortcut" in str(w.message)]
    acc = read_events(tmp_path / "tb" / "version_0")
    tags = acc.Tags()["scalars"]
    for name in ("alarm", "share", "share_ratio", "rank", "pointing", "flip_rate", "acc_drop", "control_flip_rate",
                 "control_acc_drop", "excess", "z"):
        assert f"xai/shortcut/corner/{name}" in tags, name
    alarm = acc.Scalars("xai/shortcut/corner/alarm")[-1].value
    flip = acc.Scalars("xai/shortcut/corner/flip_rate")[-1].value
    if corner:
        assert alarm == 1.0 and flip > 0.5 and len(shortcut_warnings) == 1
        assert "'corner'" in str(shortcut_warnings[0].message) and "epoch 0" in str(shortcut_warnings[0].message)
        assert monitor.alarms[0]["region"] == "corner"
    else:
        assert alarm == 0.0 and flip == 0.0 and not shortcut_warnings and not monitor.alarms
    # the evidence figure: every run, the region and its controls on the samples that moved most, and the effect
    (fig,) = drawn
    assert png_equals(acc.Images("xai/shortcut/corner/evidence")[-1].encoded_image_string, fig.image)
    lay = fig.layout
    assert lay.text("title") == [f"shortcut check · corner · epoch 0 · {'ALARM' if corner else 'no alarm'}"]
    assert lay.text("header")[:2] == ["regions", "region replaced"] and len({i for i, _ in lay.cells}) == 4
    assert lay.text("legend") == ["region", "control regions"]
    assert [t for t in lay.text("bar") if t not in ("region", "controls")] == ["output shift (mean)", "flip rate",
                                                                              "accuracy drop"]
    shift = acc.Scalars("xai/shortcut/corner/shift")[-1].value
    assert lay.text("value")[0] == f"{shift:.3f}"  # the bars are the logged figures
    x0, y0, x1, y1 = lay.cells[(0, 0)]
    cell = fig.image[:, y0:y1, x0:x1]
    red = (cell[0] > 0.85) & (cell[1] < 0.15) & (cell[2] < 0.15)
    cyan = (cell[0] < 0.1) & (cell[1] > 0.7) & (cell[2] > 0.95)
    assert bool(red.any()) and bool(cyan.any())  # the region and the control regions are outlined
    assert bool(red[: (y1 - y0) // 2, : (x1 - x0) // 2].any()) and not bool(red[(y1 - y0) // 2:, (x1 - x0) // 2:].any())


def test_stop_ends_training(tmp_path):
    train, val = loaders()
    monitor = ShortcutMonitor(regions="top_left", probe_samples=100, action="stop", find_regions=False)
    trainer = tiny_trainer(tmp_path, [monitor], max_epochs=5, logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(FrozenModule(Reader(True)), train, val)
    assert trainer.should_stop and trainer.current_epoch == 1  # stopped after the first epoch
    assert [a["epoch"] for a in monitor.alarms] == [0]



class DumpStop(pl.Callback):
    """Every rank writes where its fit ended and what the monitor acted on."""

    def __init__(self, folder, monitor):
        self.folder, self.monitor = folder, monitor

    def on_fit_end(self, trainer, pl_module):
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w", encoding="utf-8") as fh:
            json.dump({"epoch": trainer.current_epoch, "should_stop": trainer.should_stop,
                       "alarms": [a["epoch"] for a in self.monitor.alarms]}, fh)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_stop_ends_training_on_every_rank(tmp_path):
    """Under DDP (2 gloo processes) "stop" ends the fit on both ranks after the same epoch (a rank left training
    alone would wait in its next collective), and both record the alarm they acted on."""
    train, val = loaders()
    monitor = ShortcutMonitor(regions="top_left", probe_samples=100, action="stop", find_regions=False, on_error="raise")
    strategy = DDPStrategy(process_group_backend="gloo", start_method="spawn", timeout=timedelta(seconds=60))  # no hang
    trainer = tiny_trainer(tmp_path, [monitor, DumpStop(str(tmp_path), monitor)], max_epochs=5, logger=False,
                           devices=2, strategy=strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(FrozenModule(Reader(True)), train, val)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"epoch": 1, "should_stop": True, "alarms": [0]}

def test_patience_waits_for_firing_runs_in_a_row(tmp_path):
    train, val = loaders()
    monitor = ShortcutMonitor(regions="top_left", probe_samples=100, action="stop", patience=2, find_regions=False)
    trainer = tiny_trainer(tmp_path, [monitor], max_epochs=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(FrozenModule(Reader(True)), train, val)
    assert trainer.current_epoch == 2  # fired at epochs 0 and 1, acted (stopped) at the second
    assert [a["epoch"] for a in monitor.alarms] == [1]
    alarm = [e.value for e in read_events(tmp_path / "tb" / "version_0").Scalars("xai/shortcut/top_left/alarm")]
    assert alarm == [1.0, 1.0]  # the scalar logs every run's verdict
    assert monitor.state_dict()["streaks"] == {"top_left": 2}


class InputsOnlyTraining(FrozenModule):
    """Training batches hold inputs only (self-supervised style); validation batches are labelled."""

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).pow(2).mean() * 0.0


def test_unlabelled_training_batches_leave_the_shift_alone_and_the_settings_untouched(tmp_path):
    x, y = corner_set()
    train = DataLoader(TensorDataset(x), batch_size=50)
    val = DataLoader(TensorDataset(x, y), batch_size=50)
    monitor = ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=100, action="log", find_regions=False)
    trainer = tiny_trainer(tmp_path, [monitor], max_epochs=2)
    trainer.fit(InputsOnlyTraining(Reader(True)), train, val)
    assert monitor.reference_samples == 256 and monitor.reference_x is None  # the setting is kept, no references
    assert monitor.state_dict()["no_references"] is True
    events = read_events(tmp_path / "tb" / "version_0")
    assert [e.value > 3 for e in events.Scalars("xai/shortcut/corner/z")] == [True, True]
    gain_z = [e.value for e in events.Scalars("xai/shortcut/corner/gain_z")]
    assert len(gain_z) == 2 and all(math.isnan(v) for v in gain_z)  # no gain without references: the shift decides
    assert [a["epoch"] for a in monitor.alarms] == [0, 1]  # and it still fires on the corner reader
    restored = ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, find_regions=False)
    restored.load_state_dict(monitor.state_dict())
    assert not restored._wants_references  # resumed: the batches are not read again

def test_a_run_without_the_alarm_breaks_the_streak():
    from types import SimpleNamespace

    monitor = ShortcutMonitor(regions="top_left", patience=2, action="log", find_regions=False)
    verdicts = iter([True, False, True, True])
    monitor._region_figures = lambda region, results: ({"excess": 0.5}, next(verdicts))
    trainer = SimpleNamespace(world_size=1, is_global_zero=True)
    for epoch in range(4):
        monitor.report(trainer, None, torch.zeros(2, 1, 8, 8), None, {}, epoch)
    assert [a["epoch"] for a in monitor.alarms] == [3]
    restored = ShortcutMonitor(regions="top_left", patience=2, find_regions=False)
    restored.load_state_dict(monitor.state_dict())
    assert restored._streaks == {"top_left": 2}


def test_do_no_harm_and_hygiene(tmp_path):
    from helpers import digits_loaders

    def fit(callbacks, sub):
        torch.manual_seed(0)
        train, val = digits_loaders(n_train=128, n_val=64)
        module = DigitsModule(small_cnn(batchnorm=True, dropout=0.2))
        trainer = tiny_trainer(tmp_path / sub, callbacks, max_epochs=2, logger=False)
        trainer.fit(module, train, val)
        return trained_weights(module)

    monitor = ShortcutMonitor(regions={"corner": "top_left", "box": (5, 5, 3, 3)}, probe_samples=32, find_regions=True,
                              sanity_check=True, on_error="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_cb = fit([monitor], "a")
        without = fit([], "b")
    assert monitor.reference_x is not None  # the training batches were read for reference samples
    for k in without:
        assert torch.equal(with_cb[k], without[k]), k

    # direct hygiene: compute on a train-mode model with grads present, also after a forced error
    module = DigitsModule(small_cnn(batchnorm=True))
    module.train()
    module(torch.rand(4, 1, 8, 8)).sum().backward()
    x = torch.rand(16, 1, 8, 8)
    monitor = ShortcutMonitor(regions="top_left", find_regions=True, probe=(x, torch.arange(16) % 10))
    monitor._rows = (0, 16)
    before = snapshot(module)
    with monitor.explain_context(module):
        monitor.compute(module, x, torch.arange(16) % 10)
    assert_unchanged(before, module)
    bad = ShortcutMonitor(regions=lambda inp: 1 / 0, probe=(x, None))
    with pytest.raises(ZeroDivisionError):
        with bad.explain_context(module):
            bad.compute(module, x, None)
    assert_unchanged(before, module)


def test_resume_keeps_probe_set(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    train, val = loaders()
    monitor = ShortcutMonitor(regions="top_left", probe_samples=20, action="log")
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = tiny_trainer(tmp_path, [monitor, ckpt], max_epochs=1, logger=False, enable_checkpointing=True)
    trainer.fit(FrozenModule(Reader(True)), train, val)
    probe = monitor.probe_x.clone()
    resumed = ShortcutMonitor(regions="top_left", probe_samples=20, action="log")
    trainer = tiny_trainer(tmp_path, [resumed], max_epochs=2, logger=False, enable_checkpointing=True)
    _, other_val = loaders(n=60)  # different validation data: the restored probe set must win
    trainer.fit(FrozenModule(Reader(True)), train, DataLoader(TensorDataset(*corner_set(60, seed=5)), batch_size=30),
                ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed.probe_x, probe)
    assert [a["epoch"] for a in resumed.alarms] == [0, 1]  # the alarm history is restored too


def test_unknown_region_finds_mark_and_not_on_clean(tmp_path):
    """The mark carries a random code in the probe set (the shortcut absent from validation) and the class in training;
    the centre is the object.
    The rest of the image has texture, so that control regions can change the input about as much as the mark's swap
    (with nearly blank images the alarm's ``min_match`` guard declines to compare)."""
    _, val = loaders(random_mark=True, texture=0.6)
    train, _ = loaders(texture=0.6)  # planted in training: the swapped-in training marks carry their labels
    truth = torch.zeros(8, 8, dtype=torch.bool)
    truth[:2, :2] = True
    for corner in (True, False):
        monitor = ShortcutMonitor(probe_samples=100, action="log", discovery_method="input_x_gradient")
        trainer = tiny_trainer(tmp_path / str(corner), [monitor], max_epochs=1)
        trainer.fit(FrozenModule(Reader(corner)), train, val)
        acc = read_events(tmp_path / str(corner) / "tb" / "version_0")
        assert "xai/shortcut/class_maps" in acc.Tags()["images"]
        assert "xai/shortcut/spray/max_strategies" in acc.Tags()["scalars"]
        for candidate in ("flat_background", "preset_corners", "preset_border"):
            assert f"xai/shortcut/{candidate}/alarm" in acc.Tags()["scalars"]
        assert acc.Scalars("xai/shortcut/preset_corners/found")[-1].value == 1.0
        alarm = acc.Scalars("xai/shortcut/hotspot/alarm")[-1].value
        if corner:
            assert alarm == 1.0
            assert monitor.alarms and monitor.alarms[0]["region"] == "hotspot"
            assert iou(monitor.last_hotspot, truth) >= 0.5
            assert "xai/shortcut/hotspot/evidence" in acc.Tags()["images"]  # a firing candidate explains itself
        else:
            assert alarm == 0.0 and not monitor.alarms
            assert "xai/shortcut/hotspot/evidence" not in acc.Tags()["images"]


@pytest.mark.parametrize("regions", [
    pytest.param({"corner": (0, 0, 2, 2)}, id="box"),
    pytest.param({"own": torch.rand(7, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.5}, id="per_sample_masks"),
])
def test_shares_of_the_probe_set_give_the_one_process_figures(regions):
    """What each DDP rank computes (its rows of the probe set, `split_rows`) put together equals the one-process
    result, controls and swap partners included: the interventions are planned on the whole probe set with a
    generator seeded alike on every rank."""
    from lightning_xai.callbacks._ranks import split_rows

    x, y = corner_set(7, random_mark=True)
    module = FrozenModule(Reader(corner=True), lr=0.0)
    monitor = ShortcutMonitor(regions=regions, probe=(x, y), num_controls=3)
    monitor._rows = (0, 7)
    with monitor.explain_context(module):
        whole = monitor.compute(module, x, y)
    parts = []
    for rank in range(2):
        start, stop, keep = split_rows(7, 2, rank)
        monitor._rows = (start, stop)
        with monitor.explain_context(module):
            parts.append({k: v[:keep] for k, v in monitor.compute(module, x[start:stop], y[start:stop]).items()})
    name = next(iter(regions))
    assert f"{name}/control_shift" in whole
    for key, value in whole.items():
        assert torch.allclose(torch.cat([p[key] for p in parts]).float(), value.float(), atol=1e-6), key
