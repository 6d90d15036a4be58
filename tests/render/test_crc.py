"""lightning_xai._crc: CRC-32C in numpy equals TensorBoard's byte-at-a-time one, and an event file written with it is
byte for byte the file TensorBoard writes (every record's checksums verified by reading it back)."""
import glob
import struct

import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_crc

from lightning_xai import _crc
from lightning_xai import _logging as xlog


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 2047, 2048, 2049, 4096, 4097, 65537, 300_001])
def test_crc32c_is_tensorboards(n):
    data = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8).numpy().tobytes()
    assert _crc.crc32c(data) == tb_crc.crc32c(data)
    assert _crc.masked_crc32c(data) == tb_crc.masked_crc32c(data)


def test_crc32c_of_constant_runs_and_the_check_value():
    assert _crc.crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    for data in (bytes(5000), b"\xff" * 5000, bytes(range(256)) * 40):  # zero runs: the padding must not show
        assert _crc.crc32c(data) == tb_crc.crc32c(data)


def _records(path):
    """Every record of an event file, its two checksums verified with TensorBoard's function."""
    with open(path, "rb") as fh:
        blob = fh.read()
    out, at = [], 0
    while at < len(blob):
        header = blob[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", blob[at + 8:at + 12])
        data = blob[at + 12:at + 12 + length]
        (data_crc,) = struct.unpack("<I", blob[at + 12 + length:at + 16 + length])
        assert header_crc == tb_crc.masked_crc32c(header) and data_crc == tb_crc.masked_crc32c(data)
        out.append(data)
        at += 16 + length
    return out


class _Trainer:
    def __init__(self, loggers):
        self.loggers = loggers
        self.global_step = 3
        self.default_root_dir = "."


def test_logged_figures_are_written_as_tensorboard_writes_them(tmp_path):
    images = [torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    files = []
    for fast in (True, False):
        tb = TensorBoardLogger(str(tmp_path / str(fast)), name="tb", version=0)
        record = tb.experiment.file_writer.event_writer._async_writer._writer
        if not fast:  # TensorBoard's own record writer: add_png would make it fast, so mark it as done already
            record._lightning_xai_crc = True
        for i, image in enumerate(images):
            xlog.add_png(tb.experiment, f"xai/img{i}", xlog._to_uint8_hwc(image), i)
        assert ("write" in vars(record)) == fast  # only this writer's instance, nothing global
        tb.experiment.flush()
        (path,) = glob.glob(str(tmp_path / str(fast) / "tb" / "version_0" / "events.*"))
        files.append(_records(path))
    fast_records, tb_records = files
    assert len(fast_records) == len(tb_records) == 4  # the file version record and three images
    for a, b in zip(fast_records, tb_records):  # the same events but for their wall times
        ea, eb = Event.FromString(a), Event.FromString(b)
        assert (ea.step, ea.summary, ea.file_version) == (eb.step, eb.summary, eb.file_version)
    assert max(len(r) for r in fast_records) > _crc.MIN_BYTES  # the numpy path ran


def test_writers_of_another_make_are_left_alone():
    assert not _crc.fast_record_checksums(object())
