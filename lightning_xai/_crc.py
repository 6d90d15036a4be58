"""CRC-32C (Castagnoli) of large byte strings in numpy, for TensorBoard's event records.

TensorBoard checksums every record it writes (``masked_crc32c`` of the length and of the data) in pure Python, one
byte at a time: about 8 MB/s, so a 400 KB figure costs ~50 ms of a CPU core in the writer thread, more than drawing
and encoding it. :func:`crc32c` gives the same checksums, 17 times faster on such a figure;
:func:`fast_record_checksums` makes a ``SummaryWriter``'s record writer use it (the bytes written are the same).

The maths. With the state update ``s <- T[(s ^ b) & 0xFF] ^ (s >> 8)`` (reflected polynomial ``0x82F63B78``),
processing bytes is linear over GF(2) in the state and the data together, and a zero state stays zero through
zero bytes. So the data is left-padded with zeros to ``P * L`` bytes (``P`` a power of two) and cut into ``P`` chunks
of ``L`` bytes, whose states from zero are computed side by side (``L`` vector steps over ``P`` chunks). Two adjacent
blocks combine as ``Z_m(left) ^ right``, where ``Z_m`` (``m`` the right block's length) is the linear map of ``m`` zero
bytes on a state: a 32x32 bit matrix, kept as the images of the 32 unit states and built by squaring. Pairs combine
level by level (``log2 P`` vector steps). The initial state ``0xFFFFFFFF`` then enters as ``Z_n(0xFFFFFFFF)``
(``n`` the data's length), and the result is XORed with ``0xFFFFFFFF``.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any

import numpy as np

POLY = 0x82F63B78
CHUNK = 64  # bytes per chunk: vector steps per call; the chunks are the vector's length
MIN_BYTES = 2048  # shorter data: TensorBoard's own byte-at-a-time function is as fast


def _table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(POLY), t >> 1).astype(np.uint32)
    return t


TABLE = _table()
_BITS = np.arange(32, dtype=np.uint32)


def _apply(op: np.ndarray, states: np.ndarray) -> np.ndarray:
    """The linear map ``op`` (images of the 32 unit states) applied to each state of ``states``."""
    bits = (states.reshape(-1, 1) >> _BITS) & np.uint32(1)  # (n, 32)
    return np.bitwise_xor.reduce(np.where(bits.astype(bool), op, np.uint32(0)), axis=1).astype(np.uint32)


@lru_cache(maxsize=None)
def _zeros(k: int) -> np.ndarray:
    """``Z_{2^k}``: the map of ``2^k`` zero bytes, as the images of the 32 unit states."""
    if k == 0:
        unit = np.uint32(1) << _BITS
        return (TABLE[unit & np.uint32(0xFF)] ^ (unit >> np.uint32(8))).astype(np.uint32)
    half = _zeros(k - 1)
    return _apply(half, half)


def _shift(state: int, nbytes: int) -> int:
    """``Z_nbytes(state)``: ``state`` carried through ``nbytes`` zero bytes."""
    value = np.array([state], dtype=np.uint32)
    k = 0
    while nbytes:
        if nbytes & 1:
            value = _apply(_zeros(k), value)
        nbytes >>= 1
        k += 1
    return int(value[0])


def crc32c(data: bytes) -> int:
    """The CRC-32C of ``data`` (as TensorBoard's ``crc32c``).

    Example:
        >>> hex(crc32c(b"123456789"))  # the standard check value
        '0xe3069283'
    """
    n = len(data)
    if n < MIN_BYTES:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as byte_at_a_time

        return byte_at_a_time(data)
    chunks = 1 << max(0, (-(-n // CHUNK) - 1).bit_length())  # a power of two >= ceil(n / CHUNK)
    padded = np.zeros(chunks * CHUNK, dtype=np.uint8)
    padded[padded.size - n:] = np.frombuffer(data, dtype=np.uint8)
    columns = np.ascontiguousarray(padded.reshape(chunks, CHUNK).T).astype(np.uint32)  # (CHUNK, chunks)
    states = np.zeros(chunks, dtype=np.uint32)
    low = np.uint32(0xFF)
    for column in columns:  # every chunk's state from zero, side by side
        states = TABLE[(states ^ column) & low] ^ (states >> np.uint32(8))
    k = CHUNK.bit_length() - 1  # Z of one chunk: 2^k bytes
    while states.size > 1:  # adjacent blocks: Z_m(left) ^ right, m the right block's length
        states = _apply(_zeros(k), states[0::2]) ^ states[1::2]
        k += 1
    return (_shift(0xFFFFFFFF, n) ^ int(states[0])) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TensorBoard's masked CRC-32C of ``data`` (the rotation and constant of TFRecord files)."""
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def fast_record_checksums(writer: Any) -> bool:
    """Make the record writer behind ``writer`` (a ``torch.utils.tensorboard.SummaryWriter``) checksum with
    :func:`masked_crc32c`; the records it writes are byte for byte the same. Returns whether it does (False: a
    writer of another make, left alone). Only that writer changes, nothing global."""
    try:
        record = writer.file_writer.event_writer._async_writer._writer
    except AttributeError:
        return False
    if getattr(record, "_lightning_xai_crc", False):
        return True
    if type(record).__name__ != "RecordWriter" or not hasattr(record, "_writer"):
        return False

    def write(data: bytes) -> None:  # TensorBoard's RecordWriter.write, with the faster checksum
        header = struct.pack("<Q", len(data))
        record._writer.write(header + struct.pack("<I", masked_crc32c(header)) + data
                             + struct.pack("<I", masked_crc32c(data)))

    record.write = write
    record._lightning_xai_crc = True
    return True
