"""Every option of every callback, given a wrong value, is refused before training with the house message naming it.

Construction refuses what needs neither model nor data (types, ranges, choices, attribution-method options through
the method's own validator); ``setup`` and the first sample refuse what needs them (layer names, region boxes and
masks against the image size, probe indices against the validation dataset, ``target`` against the number of
classes), before any training step. ``test_every_option_has_a_bad_value`` keeps the tables complete: a new
constructor argument without a case fails it.
"""
import inspect
import math
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl

from helpers import DigitsModule, TinyTextNet, digits_loaders, tiny_trainer
from lightning_xai import (AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ProjectionMonitor,
                           SampleInfluenceMonitor, ShortcutDiscovery, ShortcutMonitor, TabularAttributionMonitor,
                           TokenAttributionMonitor)
from lightning_xai._lightning import MisconfigurationException, MisconfigurationTypeError
from lightning_xai.callbacks import XAICallback

WRONG = object()  # a wrong value for nearly every option


class Named(NamedTuple):
    """A wrong value whose message names ``name`` rather than the option (a method option checked by the method's
    own validator, a region by its name)."""
    value: Any
    name: str


REQUIRED = {  # the arguments without a default, with good values
    LinearProbeMonitor: dict(layers=["net.0.0"]),
    ProjectionMonitor: dict(layers=["net.0.0"]),
    TokenAttributionMonitor: dict(embedding_layer="embedding", vocab=["a", "b"]),
    TabularAttributionMonitor: dict(feature_names=["a", "b"]),
    ShortcutMonitor: dict(regions="top_left"),
}

COMMON = {  # XAICallback's options, and ProbeSetCallback's for the callbacks that have a probe set
    "every_n_epochs": [0, "1"],
    "run_on_fit_end": ["yes"],
    "on_error": ["ignore"],
    "prefix": ["", 3],
    "output_key": [1.5, True],
    "forward": [3],
    "channels_last": ["yes", 1, None],
    "fold_batchnorm": ["yes", 1, None],
    "probe": [[], torch.zeros(0, 1, 8, 8), [1.5], Named((torch.zeros(3, 1, 8, 8), torch.zeros(4)), "probe labels")],
    "probe_samples": [0, 2.0],
    "batch_to_xy": [3],
}

# callback -> option -> wrong values refused at construction (besides WRONG, which every option gets)
AT_CONSTRUCTION = {
    AttributionMonitor: {
        "methods": [42, ["nope"], ["saliency", "saliency"], Named([("integrated_gradients", {"steps": 0})], "steps"),
                    Named([("saliency", {"bogus": 1})], "options"), Named([("smoothgrad", {"kind": "x"})], "kind"),
                    Named([("smoothgrad", {"generator": -1})], "generator"),
                    Named([("occlusion", {"window": 0})], "window"),
                    Named([("lime", {"samples": 1})], "samples"), Named([("grad_cam", {"relu": "yes"})], "relu"),
                    Named([("integrated_gradients", {"baseline": "mean"})], "baseline")],
        "target": ["labels", -1, True],
        "denormalize": [3],
        "outlier_perc": ["1", 50, -1, math.nan],
        "top_fraction": [0, 1, "x"],
        "scale": ["per_epoch"],
        "evolution_samples": [-1, 1.5],
    },
    LinearProbeMonitor: {
        "layers": [[], [3]],
        "reduce": ["median", {"net.0.0": "median"}],
        "concepts": [3, {"label": len}, {"a/b": len}, {"a": 3}],
        "solver": ["svm"],
        "alphas": [[0], "x", [math.inf]],
        "cv": [1, "loo"],
        "holdout_every": [1, 0],
        "input_baseline": ["yes"],
        "untrained_baseline": [1],
        "memorization_threshold": [0, 1.5, "1"],
        "max_dim": [0],
        "seed": ["a", 1.5],
    },
    ProjectionMonitor: {
        "layers": [[], [""]],
        "reduce": ["median"],
        "separation": ["x"],
        "projector": ["yes"],
        "scatter": [1],
        "thumbnails": [None],
        "thumbnail_size": [0],
        "class_names": ["abc", [1]],
    },
    FeatureVisMonitor: {
        "targets": [[], [("net.0", "filters", [1])], [("logits", [0]), ("logits", [1])]],
        "steps": [0],
        "lr": [0, "x", math.nan],
        "param": ["wavelet"],
        "transforms": [[3]],
        "regularizers": [3, [3]],
        "input_shape": [(8, 8), (1, 0, 8)],
        "value_range": [(1, 0), ("a", 1), (0, 1, 2)],
        "seed": ["a"],
        "ncols": [0],
        "min_side": [0],
        "num_threads": [0],
    },
    SampleInfluenceMonitor: {
        "layer": [3],
        "capture": ["both"],
        "k": [0],
        "support_k": [0],
        "num_representers": [0],
        "num_suspects": [0],
        "num_sparse": [0],
        "lam": [0, "x"],
        "suspect_mode": ["x"],
        "max_train_samples": [0],
        "train_data": [(torch.zeros(3, 1), torch.zeros(2)), 3],
        "batch_size": [0],
        "denormalize": [3],
    },
    ShortcutMonitor: {
        "regions": [None, {}, "nowhere", (0, 0, 0, 2), (-1, 0, 2, 2), Named({"m": torch.zeros(8, 8)}, "region 'm'"),
                    Named({"m": torch.ones(5, 8, 8)}, "region 'm'")],
        "method": ["nope", Named(("saliency", {"abs": "x"}), "abs")],
        "action": ["explode"],
        "config": [Named({"alpha": 0.1}, "config"), 3],
    },
    ShortcutDiscovery: {
        "method": ["nope", Named(("integrated_gradients", {"steps": 0}), "steps")],
        "action": ["explode"],
        "config": [Named({"alpha": 0.1}, "config")],
    },
    TokenAttributionMonitor: {
        "embedding_layer": ["", 3],
        "vocab": [[], 3],
        "method": ["lime", "x"],
        "options": [3, {"bogus": 1}, {"baseline": "zero"}, Named({"steps": 0}, "steps"),
                    Named({"internal_batch_size": 0}, "internal_batch_size")],
        "target": ["x"],
        "baseline": ["mean", torch.zeros(3)],
        "pad_token_id": ["0", 1.5],
        "watch_tokens": [[1.5], True],
        "top_k": [0],
    },
    TabularAttributionMonitor: {
        "feature_names": [[], ["a", "a"], ["a/b", "a_b"], "ab"],
        "method": ["lime", "grad_cam", "nope", Named(("integrated_gradients", {"steps": 0}), "steps")],
        "target": ["x"],
        "per_class": ["yes"],
        "max_classes": [0],
        "max_features": [0],
    },
}


def options(cls):
    """Every constructor argument of ``cls``, with those it passes on to its bases through ``**kwargs``."""
    names = []
    for klass in cls.__mro__:
        if "__init__" in klass.__dict__:
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names:
                    names.append(p.name)
        if klass is XAICallback:
            break
    return names


def construction_cases():
    for cls, table in AT_CONSTRUCTION.items():
        for option in options(cls):
            for i, value in enumerate([WRONG] + table.get(option, []) + COMMON.get(option, [])):
                value, name = value if isinstance(value, Named) else (value, option)
                yield pytest.param(cls, option, value, name, id=f"{cls.__name__}-{option}-{i}")


@pytest.mark.parametrize("cls, option, value, name", list(construction_cases()))
def test_bad_option_is_refused_at_construction(cls, option, value, name):
    with pytest.raises(MisconfigurationException) as info:
        cls(**{**REQUIRED.get(cls, {}), option: value})
    assert str(info.value).startswith("Expected `") and f"`{name}`" in str(info.value), str(info.value)


def test_refusals_keep_their_kind():
    """A wrong type is also a ``TypeError``, a wrong value a ``ValueError``; both are Lightning's
    ``MisconfigurationException`` (of either package)."""
    import lightning

    with pytest.raises(MisconfigurationTypeError, match="`every_n_epochs`"):
        AttributionMonitor(every_n_epochs="1")
    with pytest.raises(TypeError, match="`methods`"):
        AttributionMonitor(methods=42)
    with pytest.raises(MisconfigurationTypeError, match="`lam`"):  # numbers given as something else
        SampleInfluenceMonitor(lam="a")
    with pytest.raises(MisconfigurationTypeError, match="`cv`"):
        LinearProbeMonitor(layers=["net.0"], cv=2.0)
    with pytest.raises(MisconfigurationException, match="`cv`") as info:  # a number out of range: a value error
        LinearProbeMonitor(layers=["net.0"], cv=1)
    assert not isinstance(info.value, TypeError)
    for make in (lambda: AttributionMonitor(on_error=3), lambda: AttributionMonitor(prefix=3),
                 lambda: AttributionMonitor(channels_last=1), lambda: AttributionMonitor(fold_batchnorm=None),
                 lambda: AttributionMonitor(scale=object()), lambda: AttributionMonitor(target=1.5),
                 lambda: AttributionMonitor(probe=1.5), lambda: AttributionMonitor(batch_to_xy=3),
                 lambda: LinearProbeMonitor(layers=["net.0"], reduce=3)):
        with pytest.raises(MisconfigurationTypeError):  # shared options and choices given as another type
            make()
    for make in (lambda: AttributionMonitor(on_error="ignore"), lambda: AttributionMonitor(prefix="/"),
                 lambda: AttributionMonitor(channels_last="yes"), lambda: AttributionMonitor(target=-1)):
        with pytest.raises(MisconfigurationException) as info:  # the right type, a wrong value
            make()
        assert not isinstance(info.value, TypeError), str(info.value)
    with pytest.raises(ValueError, match="`steps` to be a positive int, but got 0"):
        AttributionMonitor(methods=[("integrated_gradients", {"steps": 0})])
    for package in (pl, lightning.pytorch):
        with pytest.raises(package.utilities.exceptions.MisconfigurationException, match="`outlier_perc`"):
            AttributionMonitor(outlier_perc="1")


# --------------------------------------------------------------------------- refused before the first training step
class _NoTraining(pl.Callback):
    """Counts training batches: a refused option must stop the fit before the first."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args, **kwargs):
        self.steps += 1


def _images():
    return DigitsModule(), digits_loaders(n_train=64, n_val=32)


def _tokens():
    from lightning_xai.text.synthetic import spurious_token_data

    train = DataLoader(TensorDataset(*spurious_token_data(32).tensors()), batch_size=16)
    val = DataLoader(TensorDataset(*spurious_token_data(16, shortcut="random", seed=1).tensors()), batch_size=16)
    return DigitsModule(net=TinyTextNet()), (train, val)


def _rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=gen)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    return DigitsModule(net=nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))), (
        DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))


VOCAB = ["<pad>", "a", "b"]
# (callback factory, data, option, text the message must contain)
BEFORE_TRAINING = [
    (lambda: AttributionMonitor(methods=[("grad_cam", {"layer": "nope"})]), _images, "methods", "`layer` to be one of "
     "the model's layers: net, net.0, net.0.0"),
    (lambda: AttributionMonitor(methods=["saliency"], target=10), _images, "target", "`target` to be a class index "
     "below 10"),
    (lambda: AttributionMonitor(methods=["saliency"], target=10, probe=torch.rand(2, 1, 8, 8)), _images, "target",
     "`target`"),
    (lambda: AttributionMonitor(methods=["saliency"], probe=[0, 10_000]), _images, "probe", "`probe`"),
    (lambda: AttributionMonitor(methods=[("occlusion", {"window": 9})]), _images, "methods", "`window`"),
    (lambda: AttributionMonitor(methods=[("lime", {"grid": (9, 9)})]), _images, "methods", "`grid`"),
    (lambda: AttributionMonitor(methods=[("integrated_gradients", {"baseline": torch.zeros(3, 8, 8)})]), _images,
     "methods", "`baseline`"),
    (lambda: AttributionMonitor(methods=["saliency"], output_key="logits"), _images, "output_key", "`output_key`"),
    (lambda: LinearProbeMonitor(layers=["nope"]), _images, "layers", "`layers` to be names or patterns matching"),
    (lambda: LinearProbeMonitor(layers=["net.0.0"], reduce={"nope": "gap"}), _images, "reduce", "`reduce`"),
    (lambda: ProjectionMonitor(layers=["nope"]), _images, "layers", "`layers`"),
    (lambda: ProjectionMonitor(layers=["net.0.0"], probe=[10_000]), _images, "probe", "`probe`"),
    (lambda: ProjectionMonitor(layers=["net.0.0"], class_names=["zero", "one"]), _images, "class_names",
     "`class_names` to be a list of 10 names"),
    (lambda: FeatureVisMonitor(targets=[("nope", "channels", [0])], steps=2), _images, "targets", "`targets`"),
    (lambda: SampleInfluenceMonitor(layer="nope"), _images, "layer", "`layer` to be one of the model's layers"),
    (lambda: SampleInfluenceMonitor(probe=[-10_000]), _images, "probe", "`probe`"),
    (lambda: ShortcutMonitor(regions={"corner": (20, 20, 2, 2)}), _images, "regions", "inside the 8x8 images"),
    (lambda: ShortcutMonitor(regions={"m": torch.ones(5, 5)}), _images, "regions", "`region 'm'` to be a mask of "
     "shape (8, 8)"),
    (lambda: ShortcutMonitor(regions={"m": torch.ones(5, 5)}, probe=torch.rand(4, 1, 8, 8)), _images, "regions",
     "`region 'm'`"),
    (lambda: ShortcutMonitor(regions="top_left", method=("grad_cam", {"layer": "nope"})), _images, "method",
     "`layer`"),
    (lambda: ShortcutDiscovery(method=("occlusion", {"window": 9})), _images, "method", "`window`"),
    (lambda: ShortcutMonitor(regions=lambda x: torch.ones(3, 3)), _images, "regions", "`region 'region'`"),
    (lambda: TokenAttributionMonitor("nope", vocab=VOCAB), _tokens, "embedding_layer", "`embedding_layer`"),
    (lambda: TokenAttributionMonitor("net.embedding", vocab=VOCAB, target=2), _tokens, "target", "`target`"),
    (lambda: TabularAttributionMonitor(["a", "b"], target=2), _rows, "target", "`target`"),
    (lambda: TabularAttributionMonitor(["a", "b", "c"]), _rows, "feature_names", "`feature_names`"),
]


@pytest.mark.parametrize("make, data, option, match", [
    pytest.param(make, data, option, match, id=f"{i}-{option}") for i, (make, data, option, match) in
    enumerate(BEFORE_TRAINING)])
def test_bad_option_is_refused_before_the_first_training_step(tmp_path, make, data, option, match):
    module, (train, val) = data()
    counter = _NoTraining()
    trainer = tiny_trainer(tmp_path, callbacks=[make(), counter], logger=False, max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(MisconfigurationException) as info:
        trainer.fit(module, train, val)
    assert match in str(info.value), str(info.value)
    assert counter.steps == 0


def test_every_option_has_a_bad_value():
    """Each constructor argument of each callback has wrong values of its own in the tables above, so a new option
    cannot slip in with the generic ``WRONG`` alone."""
    assert set(AT_CONSTRUCTION) == {AttributionMonitor, LinearProbeMonitor, ProjectionMonitor, FeatureVisMonitor,
                                    SampleInfluenceMonitor, ShortcutDiscovery, ShortcutMonitor, TokenAttributionMonitor,
                                    TabularAttributionMonitor}
    for cls, table in AT_CONSTRUCTION.items():
        missing = [o for o in options(cls) if not table.get(o) and not COMMON.get(o)]
        assert not missing, f"{cls.__name__}: no bad value for {missing}"


# --------------------------------------------------------------------------- NaN inputs: a warning, not a crash
def _nan_rows(module_and_loaders, rows=(3,)):
    module, (train, val) = module_and_loaders
    x, y = val.dataset.tensors
    x = x.clone()
    x[list(rows)] = float("nan")
    return module, train, DataLoader(TensorDataset(x, y), batch_size=val.batch_size)


def test_nan_features_at_a_probed_layer_warn_once_naming_it(tmp_path):
    module, _, val = _nan_rows(_images())
    monitor = LinearProbeMonitor(layers=["net.0.0"], on_error="raise")
    with pytest.warns(RuntimeWarning, match="NaN/inf features at 'net.0.0'"):  # not "linalg.eigh failed to converge"
        tiny_trainer(tmp_path, logger=False, callbacks=[monitor]).validate(module, val, verbose=False)
    (run,) = monitor.history["net.0.0"].values()
    assert math.isfinite(run["accuracy"])


def test_nan_tabular_rows_warn_once(tmp_path):
    module, train, val = _nan_rows(_rows(), rows=(1, 2))
    probe = tuple(t[:8] for t in val.dataset.tensors)
    monitor = TabularAttributionMonitor(["a", "b"], method="saliency", probe=probe, on_error="raise")
    with pytest.warns(RuntimeWarning, match="2 of the 8 probe rows hold NaN/inf") as record:
        tiny_trainer(tmp_path, callbacks=[monitor], logger=False, max_epochs=2).fit(module, train, val)
    assert sum("probe rows hold NaN" in str(w.message) for w in record) == 1 and monitor.last_explained_epoch == 1
