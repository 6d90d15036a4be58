"""Rendering (colour maps, clipping, grids) and the logger fan-out, without a Trainer."""
import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_xai import _logging as xlog
from lightning_xai.render import apply_colormap, make_grid, normalize_maps, to_display


def test_normalize_maps_clips_outliers_and_centres_signed_maps():
    maps = torch.zeros(1, 1, 10, 10)
    maps[0, 0, 0, 0] = 1000.0  # one outlier
    maps[0, 0, 1, :] = 1.0
    out = normalize_maps(maps, signed=False, outlier_perc=1.0)
    assert out.shape == (1, 10, 10) and float(out.max()) == 1.0
    assert float(out[0, 1, 5]) == pytest.approx(1.0)  # not washed out by the outlier
    signed = normalize_maps(torch.tensor([[[[-2.0, 0.0, 2.0]]]]), signed=True, outlier_perc=0.0)
    assert torch.allclose(signed, torch.tensor([[[0.0, 0.5, 1.0]]]))
    nan = normalize_maps(torch.tensor([[[[float("nan"), 1.0]]]]), signed=False)
    assert torch.isfinite(nan).all()


def test_colormap_grid_and_display():
    rgb = apply_colormap(torch.tensor([[[0.0, 1.0]]]), "inferno")
    assert rgb.shape == (1, 3, 1, 2) and float(rgb[0, :, 0, 0].sum()) < 0.1 and float(rgb[0, :, 0, 1].sum()) > 2
    cells = torch.rand(2, 3, 3, 4, 5)
    grid = make_grid(cells, padding=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 6 + 1)
    assert torch.equal(grid[:, 1:5, 1:6], cells[0, 0])
    assert torch.equal(to_display(torch.full((1, 1, 2, 2), 0.5)), torch.full((1, 3, 2, 2), 0.5))  # in range: kept
    scaled = to_display(torch.tensor([[[[-3.0, 5.0]]]]))  # normalised data: min-max scaled
    assert float(scaled.min()) == 0.0 and float(scaled.max()) == 1.0
    fixed = normalize_maps(torch.tensor([[[[1.0, 4.0]]], [[[2.0, 8.0]]]]), signed=False, scale=4.0)
    assert torch.equal(fixed, torch.tensor([[[0.25, 1.0]], [[0.5, 1.0]]]))  # one scale for every map, clipped
    with pytest.raises(ValueError, match="cmap"):
        apply_colormap(torch.zeros(1, 1, 1), "no_such_map")


class _FakeWandb(WandbLogger):
    """A WandbLogger without wandb: records what it is given."""

    def __init__(self):  # noqa: D107 - deliberately skips WandbLogger.__init__ (needs the wandb package)
        self.images, self.texts = [], []

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step))

    def log_text(self, key, columns=None, data=None, step=None, **kwargs):
        self.texts.append((key, data, step))


class _Trainer(SimpleNamespace):
    """A stand-in trainer that, like a real one, can be referenced weakly (warn_once remembers per owner)."""


def _trainer(tmp_path, loggers):
    return _Trainer(loggers=loggers, default_root_dir=str(tmp_path), global_step=7)


def test_images_and_text_reach_every_image_logger(tmp_path):
    wandb = _FakeWandb()
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = _trainer(tmp_path, [tb, csv, wandb])
    image = torch.rand(3, 5, 6)
    assert xlog.log_image(trainer, "xai/test/img", image) == []  # an image logger took it: no PNG fallback
    xlog.log_text(trainer, "xai/test/text", "| a |")
    key, images, step = wandb.images[0]
    assert key == "xai/test/img" and step == 7
    assert images[0].dtype == np.uint8 and images[0].shape == (5, 6, 3)
    assert wandb.texts == [("xai/test/text", [["| a |"]], 7)]
    tb.experiment.flush()
    from helpers import read_events

    acc = read_events(tb.log_dir)
    event = acc.Images("xai/test/img")[0]
    assert event.step == 7 and (event.height, event.width) == (5, 6)
    from PIL import Image

    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))  # PNG: lossless
    assert np.array_equal(decoded, images[0])
    assert not os.path.exists(os.path.join(csv.log_dir, "xai"))


def test_scalars_reach_every_logger_through_its_public_log_metrics(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0, prefix="run")
    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = _trainer(tmp_path, [tb, csv])
    metrics = {f"xai/probe/layer{i}/accuracy": i / 10 for i in range(12)}  # more than the writer's queue of 10
    xlog.log_scalars(trainer, metrics)
    tb.experiment.flush()
    csv.save()
    from helpers import read_events

    acc = read_events(tb.log_dir)
    for tag, value in metrics.items():  # TensorBoardLogger's prefix, as its own log_metrics would add it
        (scalar,) = acc.Scalars(f"run-{tag}")
        assert scalar.step == 7 and scalar.value == pytest.approx(value)
    import csv as csv_module

    with open(os.path.join(csv.log_dir, "metrics.csv")) as fh:
        row = next(csv_module.DictReader(fh))
    assert float(row["xai/probe/layer3/accuracy"]) == pytest.approx(0.3) and int(row["step"]) == 7


def test_png_fallback_without_image_logger(tmp_path):
    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = _trainer(tmp_path, [csv])
    with pytest.warns(RuntimeWarning, match="PNG"):
        paths = xlog.log_image(trainer, "xai/a b/c", torch.ones(3, 4, 4))
    assert len(paths) == 1 and paths[0].startswith(os.path.join(csv.log_dir, "xai")) and os.path.exists(paths[0])
    xlog.log_text(trainer, "xai/t", "hello")
    assert any(f.endswith(".md") for f in os.listdir(os.path.join(csv.log_dir, "xai")))


def test_upscale_repeats_each_pixel_like_nearest_interpolation():
    from lightning_xai.render import upscale

    images = torch.rand(2, 3, 5, 7)
    big = upscale(images, min_side=12)  # factor ceil(12 / 5) = 3
    assert big.shape == (2, 3, 15, 21)
    assert torch.equal(big, torch.nn.functional.interpolate(images, scale_factor=3, mode="nearest"))
    assert upscale(images, min_side=4) is images


def test_warn_once_per_owner_and_forgotten_with_it():
    import gc
    import warnings

    class Owner:
        pass

    def warned(owner, key="k"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            xlog.warn_once(key, "message", owner=owner)
        return len(caught)

    first, second = Owner(), Owner()
    assert warned(first) == 1 and warned(first) == 0  # once per owner and key
    assert warned(second) == 1 and warned(first, "other") == 1
    del first
    gc.collect()
    assert all(o is second for o in xlog._warned_by.keys() if isinstance(o, Owner))  # the first one is forgotten
    third = Owner()  # may reuse the first one's id: it still warns
    assert warned(third) == 1
