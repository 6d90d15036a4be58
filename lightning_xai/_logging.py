"""One place for output: images, text, scalars and projector embeddings to every logger of a Trainer.

Only public APIs: TensorBoard gets images as PNG summaries through its ``SummaryWriter``'s ``file_writer.add_summary``
(encoded here at zlib level 1; ``add_image`` when the writer has no open ``file_writer``), ``add_text`` and
``add_custom_scalars``, and projector files written with :func:`tensorboard.plugins.projector.visualize_embeddings`;
W&B gets ``log_image``/``log_text``;
loggers that cannot take images (CSV, custom ones) are skipped, and when no logger can take an image
it is written as a PNG under the run's log directory with a single warning. Scalars go to every
logger. Call these on global rank zero only; nothing here runs a collective operation.
"""
from __future__ import annotations

import math
import os
import re
import struct
import weakref
import zlib
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_xai._crc import fast_record_checksums
from lightning_xai._lightning import is_a
from lightning_xai.render._canvas import Figure

Logger = Any  # a logger of either Lightning package

PNG_LEVEL = 1  # zlib level of the PNGs encoded here (encode_png): far faster than TensorBoard's 6 (docs/benchmarks.md)
UP_SHARE = 0.25  # a row is Up-filtered only below this share of its unfiltered magnitude: the CIFAR-sized
# attribution figure 408 -> 370 KB and faster, smooth images as small as before (docs/benchmarks.md)

_warned: set = set()
_warned_by: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


def warn_once(key: str, message: str, category: type = RuntimeWarning, owner: Any = None) -> None:
    """``rank_zero_warn`` a message once per process and key; with ``owner`` (a callback, say), once per key and
    owner, forgotten with the owner (an ``id`` in the key could come back on a new object and silence it)."""
    seen = _warned
    if owner is not None:
        try:
            seen = _warned_by.setdefault(owner, set())
        except TypeError:  # not weakly referable: keyed by id, as good as it gets
            key = f"{id(owner)}-{key}"
    if key not in seen:
        seen.add(key)
        rank_zero_warn(message, category=category)


def logging_step(trainer: Any) -> int:
    """``trainer.global_step`` (public): every lightning_xai image and scalar of a run is written at it, so they
    line up with each other. Lightning writes its own epoch-end ``self.log`` scalars at a private counter, one
    step lower during ``fit``'s validation with one optimizer."""
    return int(trainer.global_step)


def _is_tensorboard(logger: Logger) -> bool:
    return is_a(logger, "TensorBoardLogger")


def _is_wandb(logger: Logger) -> bool:
    return is_a(logger, "WandbLogger")


def image_loggers(trainer: Any) -> List[Logger]:
    """The loggers of ``trainer`` that can take images."""
    return [lg for lg in trainer.loggers if _is_tensorboard(lg) or _is_wandb(lg)]


def tensorboard_writers(trainer: Any) -> List[Any]:
    """``SummaryWriter`` objects of every TensorBoard logger of ``trainer``."""
    return [lg.experiment for lg in trainer.loggers if _is_tensorboard(lg)]


def fallback_dir(trainer: Any) -> str:
    """Where PNG/text files go when no logger takes images (no collective call, unlike ``trainer.log_dir``)."""
    for lg in trainer.loggers:
        path = getattr(lg, "log_dir", None)
        if path:
            return os.path.join(path, "xai")
    return os.path.join(trainer.default_root_dir, "xai")


def _file_name(trainer: Any, tag: str, step: int, ext: str) -> str:
    """``<tag>_step<step>.<ext>``, with the stage before the step outside ``fit`` (``validate()`` and then ``test()``
    at the same step would otherwise write the same file)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag.strip("/"))
    stage = getattr(getattr(getattr(trainer, "state", None), "fn", None), "value", None)
    middle = f"_{stage}" if isinstance(stage, str) and stage != "fit" else ""
    return f"{safe}{middle}_step{step:07d}.{ext}"


def _to_uint8_hwc(image: Tensor) -> Any:
    """``(3, H, W)`` in ``[0, 1]`` -> a contiguous ``(H, W, 3)`` uint8 array, rounded to nearest. In numpy: torch runs
    these element-wise kernels in parallel, and on busy cores each then waits milliseconds for a second thread."""
    hwc = np.moveaxis(image.detach().float().cpu().numpy(), 0, -1)
    return np.clip(hwc * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: Any, level: int = PNG_LEVEL) -> bytes:
    """PNG bytes of ``pixels (H, W, 3)`` uint8 (lossless) at zlib ``level`` (0-9).

    Each row is stored unfiltered unless PNG's Up filter (its difference to the row above) brings the sum of its
    byte magnitudes read as signed (libpng's measure) under :data:`UP_SHARE` of the unfiltered row's, then the
    image is deflated at ``level``. The figures' rows repeat (cells enlarged by repeated pixels, white space), which
    deflate's matches catch in unfiltered rows; Up pays where rows change smoothly (feature visualisations). Pillow's
    encoder, trying all five filters per row, took twice as long for files as large or larger (docs/benchmarks.md).
    Grey ``(H, W)``/``(H, W, 1)`` and RGBA ``(H, W, 4)`` are written too.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    h, w, c = pixels.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]  # grey, RGB, RGBA
    rows = pixels.reshape(h, w * c)
    up = np.empty_like(rows)  # Up filter: the first row's "row above" is zeros
    up[0] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=up[1:])  # modulo 256, as PNG's filters
    magnitude = lambda a: np.minimum(a, np.negative(a)).sum(1, dtype=np.uint32)  # noqa: E731 - |byte as int8|
    use_up = magnitude(up) < UP_SHARE * magnitude(rows)  # (H,)
    body = np.empty((h, 1 + w * c), dtype=np.uint8)  # each row: its filter type byte, then its bytes
    body[:, 0] = np.where(use_up, 2, 0)
    body[:, 1:] = rows
    body[use_up, 1:] = up[use_up]
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(body, level)) + _png_chunk(b"IEND", b""))


def _torch_summary_writer(writer: Any) -> bool:
    """Whether ``writer`` is torch's ``SummaryWriter`` (whose file writer takes ``tensorboard``'s protos; a
    tensorboardX writer takes its own)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # no tensorboard package: the writer is something else
        return False
    return isinstance(writer, SummaryWriter)


def add_png(writer: Any, tag: str, pixels: Any, step: int) -> None:
    """Write ``pixels (H, W, 3)`` uint8 to a TensorBoard ``writer`` as an image summary at ``step``.

    A torch ``SummaryWriter`` with an open ``file_writer`` gets the PNG encoded here at :data:`PNG_LEVEL` through
    ``file_writer.add_summary`` (public API; TensorBoard's ``add_image`` encodes at zlib level 6, most of the cost of
    logging a large figure); any other writer (closed, tensorboardX) gets ``add_image``. The pixels are the same.
    The torch writer's records are then checksummed by :func:`lightning_xai._crc.fast_record_checksums` (the same
    bytes; TensorBoard's own checksum of a large figure costs more than encoding it).
    """
    file_writer = getattr(writer, "file_writer", None) if _torch_summary_writer(writer) else None
    if file_writer is None:
        writer.add_image(tag, pixels, global_step=step, dataformats="HWC")  # uint8: exact
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    fast_record_checksums(writer)
    h, w, c = pixels.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=encode_png(pixels))
    file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def log_image(trainer: Any, tag: str, image: Any, step: Optional[int] = None) -> List[str]:
    """Send an image ``(3, H, W)`` in ``[0, 1]``, or a :class:`~lightning_xai.render.Figure` (its uint8 pixels as
    drawn), to every image-capable logger (TensorBoard: :func:`add_png`).

    Returns:
        The file paths written when no logger could take it (empty otherwise).
    """
    step = logging_step(trainer) if step is None else step
    pixels = image.pixels if isinstance(image, Figure) else _to_uint8_hwc(image)  # (H, W, 3) uint8
    loggers = image_loggers(trainer)
    for lg in loggers:
        if _is_tensorboard(lg):
            add_png(lg.experiment, tag, pixels, step)
        else:
            lg.log_image(key=tag, images=[pixels], step=step)
    if loggers:
        return []
    folder = fallback_dir(trainer)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, _file_name(trainer, tag, step, "png"))
    with open(path, "wb") as fh:
        fh.write(encode_png(pixels))
    warn_once(
        "no-image-logger",
        "No logger that can take images (TensorBoardLogger or WandbLogger) is attached; lightning_xai writes "
        f"its images as PNG files under {folder!r} instead.",
        owner=trainer,
    )
    return [path]


def log_text(trainer: Any, tag: str, text: str, step: Optional[int] = None) -> None:
    """Send markdown text to TensorBoard/W&B loggers, or to a ``.md`` file beside the PNG fallback."""
    step = logging_step(trainer) if step is None else step
    loggers = image_loggers(trainer)
    for lg in loggers:
        if _is_tensorboard(lg):
            lg.experiment.add_text(tag, text, global_step=step)
        else:
            lg.log_text(key=tag, columns=["text"], data=[[text]], step=step)
    if not loggers:
        folder = fallback_dir(trainer)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, _file_name(trainer, tag, step, "md")), "w", encoding="utf-8") as fh:
            fh.write(text)


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
    """Write scalars to every logger directly (for hooks where ``pl_module.log`` is not allowed)."""
    step = logging_step(trainer) if step is None else step
    clean: Dict[str, float] = {k: float(v) for k, v in metrics.items()}
    for lg in trainer.loggers:
        lg.log_metrics(clean, step=step)


def add_custom_scalars(trainer: Any, layout: Dict[str, Dict[str, list]]) -> None:
    """Register a TensorBoard custom-scalars layout (``{category: {chart: ["Multiline", [tags]]}}``)."""
    for writer in tensorboard_writers(trainer):
        writer.add_custom_scalars(layout)


def markdown_table(header: List[str], rows: List[List[Any]]) -> str:
    """A small markdown table (TensorBoard's text plugin renders it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def log_embedding(trainer: Any, tag: str, features: Tensor, step: int, metadata: Optional[List[Any]] = None,
                  header: Optional[List[str]] = None, thumbnails: Optional[Tensor] = None) -> int:
    """Add ``features (N, D)`` to TensorBoard's projector of every TensorBoard logger, as ``<tag>:<step>``.

    Writes ``<step:05d>/<tag>/{tensors,metadata}.tsv`` and ``sprite.png`` (``thumbnails (N, 3, h, w)`` in
    ``[0, 1]``, tiled in a square) under the logger's directory and merges the entry into its
    ``projector_config.pbtxt`` (read, entry of the same name replaced, written back with
    :func:`tensorboard.plugins.projector.visualize_embeddings`), so a run resumed into the same directory
    keeps the embeddings of its earlier epochs. ``metadata``: one label (or, with ``header``, one row) per sample.

    Returns:
        The number of TensorBoard loggers written to.
    """
    writers = tensorboard_writers(trainer)
    if not writers:
        return 0
    from google.protobuf import text_format
    from tensorboard.plugins import projector

    feats = features.detach().float().cpu()
    name = f"{tag}:{step:05d}"
    subdir = f"{step:05d}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag.strip('/'))}"
    for writer in writers:
        logdir = writer.get_logdir()
        folder = os.path.join(logdir, subdir)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tensors.tsv"), "w", encoding="utf-8") as fh:
            fh.writelines("\t".join(repr(float(v)) for v in row) + "\n" for row in feats.tolist())
        info = projector.EmbeddingInfo(tensor_name=name, tensor_path=f"{subdir}/tensors.tsv")
        if metadata is not None:
            rows = ([header] if header else []) + [row if header else [row] for row in metadata]
            with open(os.path.join(folder, "metadata.tsv"), "w", encoding="utf-8") as fh:
                fh.writelines("\t".join(str(c) for c in row) + "\n" for row in rows)
            info.metadata_path = f"{subdir}/metadata.tsv"
        if thumbnails is not None:
            _write_sprite(os.path.join(folder, "sprite.png"), thumbnails)
            info.sprite.image_path = f"{subdir}/sprite.png"
            info.sprite.single_image_dim.extend([int(thumbnails.shape[3]), int(thumbnails.shape[2])])
        config = projector.ProjectorConfig()
        path = os.path.join(logdir, "projector_config.pbtxt")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    text_format.Parse(fh.read(), config)
            except text_format.ParseError as err:
                warn_once(f"projector-config-{path}", f"lightning_xai could not read {path!r} ({err}); the projector "
                                                      "tab lists only the embeddings written from now on.")
                config = projector.ProjectorConfig()
        kept = [e for e in config.embeddings if e.tensor_name != name]
        del config.embeddings[:]
        config.embeddings.extend(kept + [info])
        projector.visualize_embeddings(logdir, config)
    return len(writers)


def _write_sprite(path: str, thumbnails: Tensor) -> None:
    """Tile ``(N, 3, h, w)`` thumbnails row by row into a square PNG (the projector's sprite format)."""
    from PIL import Image

    n, _, h, w = thumbnails.shape
    side = max(1, math.ceil(math.sqrt(n)))
    sheet = torch.zeros(3, side * h, side * w)
    for i, img in enumerate(thumbnails.detach().float().cpu().clamp(0, 1)):
        r, c = divmod(i, side)
        sheet[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    Image.fromarray(_to_uint8_hwc(sheet)).save(path, format="PNG")
