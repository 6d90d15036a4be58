"""Bad inputs and odd set-ups each get a clear error or a documented, harmless outcome (README table)."""
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import DigitsModule, digits_data, digits_loaders, read_events, tiny_trainer
from lightning_xai import AttributionMonitor, LinearProbeMonitor


def test_nan_inputs_give_a_warning_and_training_goes_on(tmp_path):
    x = torch.rand(4, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    monitor = AttributionMonitor(methods=("saliency",), probe=(x, torch.arange(4)))
    train, val = digits_loaders()
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=1)
        trainer.fit(DigitsModule(), train, val)
    assert monitor.last_explained_epoch == 0  # still logged: non-finite pixels drawn as 0
    assert "xai/attribution/saliency" in read_events(trainer.logger.log_dir).Tags()["images"]


class DivergedModule(DigitsModule):
    """Outputs NaN outside training, as a model whose weights diverged would."""

    def forward(self, x):
        out = super().forward(x)
        return out if self.training else out * float("nan")


def test_a_model_whose_outputs_are_nan_gets_one_warning_per_callback(tmp_path):
    from lightning_xai import FeatureVisMonitor, SampleInfluenceMonitor, ShortcutMonitor

    monitors = [AttributionMonitor(methods=("saliency",), probe_samples=4),
                ShortcutMonitor(regions={"corner": (0, 0, 2, 2)}, probe_samples=8),
                FeatureVisMonitor(targets=[("logits", [0, 1])], every_n_epochs=1, steps=2),
                SampleInfluenceMonitor(probe_samples=4)]
    train, val = digits_loaders()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(tmp_path, callbacks=monitors, max_epochs=2).fit(DivergedModule(), train, val)
    said = [str(w.message) for w in caught if "NaN or infinite" in str(w.message)]
    for monitor in monitors:  # each says it once, with how many samples
        mine = [m for m in said if m.startswith(type(monitor).__name__ + ":")]
        assert len(mine) == 1 and " at epoch 0" in mine[0] and "diverged" in mine[0], said


def test_empty_validation_set_is_quiet_and_harmless(tmp_path):
    train, _ = digits_data()
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)
    monitors = [AttributionMonitor(methods=("saliency",)), LinearProbeMonitor(layers=["net.0.*"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = tiny_trainer(tmp_path, callbacks=monitors, max_epochs=1)
        trainer.fit(DigitsModule(), DataLoader(train, batch_size=32), empty)
    assert trainer.current_epoch == 1
    assert monitors[0].probe_x is None and monitors[0].errors == 0 and monitors[1].errors == 0


def test_classes_without_samples_are_skipped_by_the_stratified_probe_set(tmp_path):
    train, val = digits_data(n_val=200)
    x, y = val.tensors
    keep = y < 3  # only classes 0, 1, 2 in validation
    monitor = AttributionMonitor(methods=("saliency",), probe_samples=9)
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=1)
    trainer.fit(DigitsModule(), DataLoader(train, batch_size=32),
                DataLoader(TensorDataset(x[keep], y[keep]), batch_size=32))
    assert monitor.probe_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_bf16_mixed_precision_works(tmp_path):
    monitor = AttributionMonitor(methods=("saliency", ("integrated_gradients", {"steps": 4})), probe_samples=4)
    train, val = digits_loaders()
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=1, precision="bf16-mixed")
    trainer.fit(DigitsModule(), train, val)
    assert monitor.errors == 0 and monitor.last_explained_epoch == 0


def test_sharded_strategy_is_refused_at_setup(tmp_path):
    from pytorch_lightning.strategies import FSDPStrategy
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    monitor = AttributionMonitor(methods=("saliency",))
    fake = SimpleTrainer(FSDPStrategy.__new__(FSDPStrategy))  # FSDP cannot be set up on this CPU box
    with pytest.raises(MisconfigurationException, match="FSDP"):
        monitor.setup(fake, DigitsModule(), "fit")


class SimpleTrainer:
    def __init__(self, strategy):
        self.strategy = strategy
