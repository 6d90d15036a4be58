"""log_image's PNG path: encoded here at zlib level 1 and written through the SummaryWriter's public
``file_writer.add_summary``; ``add_image`` for a writer without an open file writer. Pixels read back exactly."""
import io

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_xai import _logging as xlog
from helpers import read_events


class _Trainer:
    def __init__(self, tmp_path, loggers):
        self.loggers, self.default_root_dir, self.global_step = loggers, str(tmp_path), 3


def _pixels(image):
    return (image.permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def _decoded(encoded):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def _zlib_level(encoded):
    """The compression level a PNG's zlib stream declares (FLEVEL of its header: 0 fastest .. 3 maximum)."""
    start = encoded.index(b"IDAT") + 4
    return encoded[start + 1] >> 6


def test_png_is_written_at_level_1_through_the_file_writer_and_read_back_exactly(tmp_path, monkeypatch):
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)

    def refuse(*args, **kwargs):
        raise AssertionError("add_image must not run when the writer has an open file_writer")

    monkeypatch.setattr(tb.experiment, "add_image", refuse)
    image = torch.rand(3, 40, 56)
    assert xlog.log_image(_Trainer(tmp_path, [tb]), "xai/png", image) == []
    tb.experiment.flush()
    (event,) = read_events(tb.log_dir).Images("xai/png")
    assert event.step == 3 and (event.height, event.width) == (40, 56)
    assert np.array_equal(_decoded(event.encoded_image_string), _pixels(image))  # lossless, rounded as log_image does
    assert event.encoded_image_string == xlog.encode_png(_pixels(image), 1)
    assert _zlib_level(event.encoded_image_string) == 0  # zlib's header: level 1 is FLEVEL 0 ("fastest")
    assert _zlib_level(xlog.encode_png(_pixels(image), 6)) == 2  # TensorBoard's level 6: FLEVEL 2 ("default")


def test_a_closed_writer_falls_back_to_add_image_and_reopens(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    writer = tb.experiment
    writer.close()
    assert writer.file_writer is None
    image = torch.rand(3, 9, 11)
    xlog.log_image(_Trainer(tmp_path, [tb]), "xai/closed", image)
    writer.flush()
    (event,) = read_events(tb.log_dir).Images("xai/closed")
    assert np.array_equal(_decoded(event.encoded_image_string), _pixels(image))


class _Writer:
    """A writer without ``file_writer`` (as tensorboardX's or a user's): only ``add_image``."""

    def __init__(self):
        self.calls = []

    def add_image(self, tag, img, global_step=None, dataformats="CHW"):
        self.calls.append((tag, img, global_step, dataformats))


class _OtherTensorBoard(TensorBoardLogger):
    def __init__(self, root):
        super().__init__(root, name="other", version=0)
        self.writer = _Writer()

    @property
    def experiment(self):
        return self.writer


def test_a_writer_without_file_writer_gets_add_image(tmp_path):
    tb = _OtherTensorBoard(str(tmp_path))
    image = torch.rand(3, 6, 5)
    assert xlog.log_image(_Trainer(tmp_path, [tb]), "xai/other", image) == []
    ((tag, pixels, step, formats),) = tb.writer.calls
    assert (tag, step, formats) == ("xai/other", 3, "HWC")
    assert pixels.dtype == np.uint8 and np.array_equal(pixels, _pixels(image))


def test_a_foreign_writer_with_a_file_writer_is_not_handed_tensorboard_protos():
    writer = _Writer()
    writer.file_writer = object()  # e.g. tensorboardX's, which takes its own protos
    xlog.add_png(writer, "t", np.zeros((2, 2, 3), np.uint8), 0)
    assert len(writer.calls) == 1


@pytest.mark.parametrize("level", [pytest.param(1, id="level-1"), pytest.param(6, id="level-6")])
def test_encode_png_is_lossless(level):
    pixels = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    encoded = xlog.encode_png(pixels, level)
    assert np.array_equal(_decoded(encoded), pixels)


@pytest.mark.parametrize("shape", [pytest.param((1, 1, 3), id="1x1"), pytest.param((1, 9, 3), id="one-row"),
                                   pytest.param((9, 1, 3), id="one-column"), pytest.param((20, 30, 4), id="rgba"),
                                   pytest.param((9, 11), id="grey")])
@pytest.mark.parametrize("content", ["noise", "repeated-rows", "smooth", "white"])
def test_encode_png_rows_filtered_or_not_decode_exactly(shape, content):
    """Each row is stored unfiltered or with the Up filter (whichever the heuristic picks): Pillow decodes the
    same pixels, whatever the content and shape."""
    from PIL import Image

    rng = np.random.default_rng(1)
    if content == "noise":
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    elif content == "repeated-rows":  # cells enlarged by repeating pixels
        pixels = np.repeat(rng.integers(0, 256, (shape[0] // 2 + 1,) + shape[1:], dtype=np.uint8), 2, 0)[:shape[0]]
    elif content == "smooth":
        ramp = np.add.outer(np.arange(shape[0]), 3 * np.arange(shape[1])) % 256
        pixels = np.broadcast_to(ramp.reshape(shape[:2] + (1,) * (len(shape) - 2)), shape).astype(np.uint8)
    else:
        pixels = np.full(shape, 255, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(xlog.encode_png(pixels))))
    assert np.array_equal(decoded.reshape(pixels.shape), pixels)


def test_a_figure_is_logged_from_its_uint8_pixels(tmp_path):
    """A Figure goes to TensorBoard as the pixels it was drawn with: the same PNG as its float image would give."""
    from lightning_xai.render import attribution_figure

    g = torch.Generator().manual_seed(0)
    fig = attribution_figure(torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g), False,
                             title="t", scale=1.0)
    assert fig.pixels.dtype == np.uint8 and fig.pixels.shape == fig.image.permute(1, 2, 0).shape
    torch.testing.assert_close(fig.image, torch.from_numpy(fig.pixels).permute(2, 0, 1).float() / 255, rtol=0,
                               atol=1e-7)
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = _Trainer(tmp_path, [tb])
    xlog.log_image(trainer, "xai/figure", fig)
    xlog.log_image(trainer, "xai/image", fig.image)
    tb.experiment.flush()
    acc = read_events(tb.log_dir)
    (from_figure,), (from_image,) = acc.Images("xai/figure"), acc.Images("xai/image")
    assert from_figure.encoded_image_string == from_image.encoded_image_string
    assert np.array_equal(_decoded(from_figure.encoded_image_string), fig.pixels)


def _filters(encoded):
    """The filter type byte of each row of a PNG written by encode_png (one IDAT)."""
    import struct
    import zlib

    width, height = struct.unpack(">II", encoded[16:24])
    length = struct.unpack(">I", encoded[33:37])[0]
    body = zlib.decompress(encoded[41:41 + length])
    stride = len(body) // height
    return [body[i * stride] for i in range(height)]


def test_encode_png_up_filter_only_where_rows_change_smoothly():
    """Rows of noise cells enlarged by repeated pixels are stored unfiltered (Up of new noise is as noisy, and it hid
    rows deflate would match: the CIFAR-sized figure came out 10 % larger); a repeated row (Up: all zeros) may take
    either; a smooth vertical ramp is Up-filtered."""
    rng = np.random.default_rng(0)
    cells = np.repeat(np.repeat(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), 2, 0), 2, 1)  # (32, 32, 3)
    ramp = np.broadcast_to((np.arange(32)[:, None, None] * 3 + np.arange(32)[None, :, None]) % 256,
                           (32, 32, 3)).astype(np.uint8)
    assert set(_filters(xlog.encode_png(cells))[::2]) == {0}
    assert set(_filters(xlog.encode_png(ramp))[1:]) == {2}
    for pixels in (cells, ramp):
        assert np.array_equal(_decoded(xlog.encode_png(pixels)), pixels)
