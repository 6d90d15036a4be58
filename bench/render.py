"""Benchmark: milliseconds per figure, and the share of rendering in an AttributionMonitor run on the demo.

    python bench/render.py [--repeats 20] [--epochs 4] [--threads 2]

Part 1 draws each figure the callbacks log, at the demo's sizes (8x8 digits) and one at the CIFAR-sized benchmark's (32
images of 3x32x32, ``bench/cifar.py``; also with new captions at every call, as in a fit, where each caption is rendered
by PIL again rather than taken from the text cache), ``--repeats`` times after a warm-up (fonts and colour maps are
loaded once per process), and prints the median milliseconds per figure as the library draws it (one torch thread:
``render._maps.one_thread``) and with ``--threads`` torch threads (the figure functions' own setting switched off,
interleaved with the first), then encoding it as PNG with Pillow at zlib level 6 (what TensorBoard's ``add_image`` does)
and at level 1, and with ``log_image``'s own encoder (``_logging.encode_png``: rows unfiltered or Up-filtered, zlib
level 1), that file's size, and the CRC-32C TensorBoard's record writer computes over it in pure Python (in its writer
thread, after ``log_image`` returns) and the one ``log_image`` makes it use (``lightning_xai._crc``, numpy). The load
average is printed with the table.

Part 2 fits the shortcut-digits demo's model for ``--epochs`` epochs with the demo's AttributionMonitor
(saliency, SmoothGrad, Integrated Gradients; 20 probe samples) and times, inside the monitor's runs, the figure
functions (probe figure and evolution figure per method) and, apart, ``log_image`` (PNG encoding and the event
writer), against the run's whole wall time (the cost ledger): ratios measured in one run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from lightning_xai import render  # noqa: E402
from lightning_xai.render import _maps as maps_module  # noqa: E402
from lightning_xai.render import (CYAN, RED, attribution_figure, barh_image, evidence_figure,  # noqa: E402
                                  evolution_figure, grid_figure, image_figure, maps_figure, matrix_figure,
                                  scatter_image, share_maps)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: fonts, colour maps, matplotlib's first figure
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _paired_ms(fn: Callable[[], object], repeats: int) -> Tuple[float, float]:
    """Median milliseconds of ``fn`` as the library runs it (one torch thread) and with every torch thread (the figure
    functions' :func:`~lightning_xai.render._maps.one_thread` replaced by a no-op), the two interleaved."""
    own = maps_module.one_thread
    fn()  # warm-up: fonts, colour maps, matplotlib's first figure
    times: Tuple[List[float], List[float]] = ([], [])
    try:
        for _ in range(repeats):
            for k, threaded in enumerate((own, contextlib.nullcontext)):
                maps_module.one_thread = threaded
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
    finally:
        maps_module.one_thread = own
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def _png_ms(image: torch.Tensor, repeats: int, level: int = 6) -> float:
    """Milliseconds to encode ``image`` as PNG: with Pillow at zlib ``level`` (``add_image``'s encoder at 6), or,
    ``level=None``, with ``log_image``'s own encoder (:func:`~lightning_xai._logging.encode_png`)."""
    from PIL import Image

    from lightning_xai._logging import encode_png

    hwc = (image.permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    if level is None:
        return _median_ms(lambda: encode_png(hwc), repeats)
    return _median_ms(lambda: Image.fromarray(hwc).save(io.BytesIO(), format="PNG", compress_level=level), repeats)


def _record_cost(image: torch.Tensor, repeats: int) -> Tuple[int, float, float]:
    """Bytes of the PNG ``log_image`` writes, and milliseconds of the CRC a record writer computes over them:
    TensorBoard's (``masked_crc32c``, pure Python) and ``lightning_xai._crc``'s, which ``log_image`` has the torch
    writer use (numpy); both in the writer's thread."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from lightning_xai._crc import masked_crc32c as ours
    from lightning_xai._logging import _to_uint8_hwc, encode_png

    data = encode_png(_to_uint8_hwc(image))
    return len(data), _median_ms(lambda: masked_crc32c(data), repeats), _median_ms(lambda: ours(data), repeats)


def figures(repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    digits = torch.rand(32, 1, 8, 8, generator=g)
    maps = share_maps(torch.rand(32, 1, 8, 8, generator=g), signed=False)
    captions = [[f"label {i % 10} · pred {i % 10}", f"conf 0.9{i % 10} · expl. {i % 10}"] for i in range(32)]
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[:, :2, :2] = True

    def evolution():
        return evolution_figure(digits[:4], [(str(e), maps[:4]) for e in range(8)], False,
                                title="saliency over the epochs", scale=3.0, row_labels=[["#0", "label 0"]] * 4,
                                cell_captions=[[[]] + [["1", "0.93"]] * 8] * 4)

    def representers():
        return grid_figure(torch.rand(8, 9, 3, 48, 48, generator=g), title="representer points · epoch 1",
                           headers=["probe"] + ["1"] * 8, groups=[(1, 5, "push up"), (5, 9, "push down")],
                           dividers=[1, 5], cell_captions=[[["label 1", "pred 1"]] + [["y 3", "+1.23"]] * 8] * 8,
                           frames=[[RED] * 9] * 8)

    def evidence():
        return evidence_figure(digits[:4], masks, masks.unsqueeze(1).expand(4, 8, 8, 8), digits[:4],
                               title="shortcut check",
                               captions=[["pred 1 → 2 · shift 0.9", "controls: shift 0.1"]] * 4,
                               bars=[("output shift", [("region", 0.4, RED), ("controls", 0.1, CYAN)])])

    calls = itertools.count()

    def fresh_captions():
        """In a fit every epoch's captions are new strings (confidences, predictions): each line is rendered by PIL
        again instead of coming from the canvas' text cache."""
        n = next(calls)
        lines = [[f"label {i % 10} · pred {(i + n) % 10}", f"conf {(37 * (i + 32 * n)) % 1000 / 1000:.3f} · expl. "
                  f"{(i + n) % 10}"] for i in range(32)]
        return attribution_figure(cifar, cifar_maps, False, title=f"saliency · epoch {n}", captions=lines, scale=3.0)

    cifar = torch.rand(32, 3, 32, 32, generator=g)
    cifar_maps = share_maps(torch.rand(32, 3, 32, 32, generator=g), signed=False)
    cases: Dict[str, Callable[[], object]] = {
        "attribution, 20 probe digits": lambda: attribution_figure(
            digits[:20], maps[:20], False, title="saliency · epoch 3", captions=captions[:20], scale=3.0),
        "attribution, 32 probe images 3x32x32": lambda: attribution_figure(
            cifar, cifar_maps, False, title="saliency · epoch 3", captions=captions, scale=3.0),
        "attribution, 32 probe images 3x32x32, new captions at every call (as in a fit)": fresh_captions,
        "attribution, 32 probe digits": lambda: attribution_figure(
            digits, maps, False, title="saliency · epoch 3", captions=captions, scale=3.0),
        "evolution, 4 samples x 8 epochs": evolution,
        "probe matrix, 9 layers x 9 epochs": lambda: matrix_figure(
            100 * torch.rand(9, 9, generator=g), [f"net.{i}" for i in range(9)], ["init"] + [str(e) for e in range(8)],
            title="probe", hi=100.0, fmt="{:.0f}"),
        "featvis, 10 classes": lambda: image_figure(digits[:10], title="feature visualisation · logits · epoch 5",
                                                    captions=[[f"class {i}", "4.21"] for i in range(10)]),
        "representers, 8 probes x (1 + 2 x 4)": representers,
        "class maps, 10 classes": lambda: maps_figure(maps[:10], title="class maps",
                                                      captions=[[f"class {i}"] for i in range(10)]),
        "shortcut evidence, 4 samples": evidence,
        "PCA scatter (matplotlib)": lambda: scatter_image(torch.randn(256, 2, generator=g), torch.arange(256) % 10,
                                                          title="net.1.2, epoch 3"),
        "bars (matplotlib)": lambda: barh_image(torch.rand(8, generator=g), [f"feature {i}" for i in range(8)],
                                                title="t"),
    }
    print(f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} (1, 5, 15 min) on "
          f"{os.cpu_count()} cores; torch threads {torch.get_num_threads()}\n")
    print("| figure | size (W x H) | ms / figure | ms, all torch threads | PNG ms (Pillow, level 6) "
          "| PNG ms (Pillow, level 1) | PNG ms (log_image's encoder) | PNG KB (log_image's) "
          "| TensorBoard's record CRC ms | record CRC ms (lightning_xai._crc) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, fn in cases.items():
        out = fn()
        image = out.image if isinstance(out, render.Figure) else out
        size = f"{image.shape[2]} x {image.shape[1]}"
        one, every = _paired_ms(fn, repeats)
        png = [_png_ms(image, max(3, repeats // 4), level) for level in (6, 1, None)]
        size_b, crc, crc_ours = _record_cost(image, max(3, repeats // 4))
        print(f"| {name} | {size} | {one:.1f} | {every:.1f} | {png[0]:.1f} | {png[1]:.1f} | {png[2]:.1f} | "
              f"{size_b / 1000:.0f} | {crc:.1f} | {crc_ours:.1f} |")
    print(f"\nload average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


def attribution_share(epochs: int) -> None:
    import warnings

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_xai.callbacks._attribution as module
    from lightning_xai import AttributionMonitor
    from lightning_xai.callbacks import _cost as cost
    from lightning_xai.datasets import shortcut_digits
    from shortcut_digits import DigitsClassifier

    spent: Dict[str, List[float]] = {"draw": [], "log": []}
    for name, kind in (("attribution_figure", "draw"), ("evolution_figure", "draw"), ("log_image", "log")):
        original = getattr(module, name)

        def timed(*args, _original=original, _kind=kind, **kwargs):
            start = time.perf_counter()
            out = _original(*args, **kwargs)
            spent[_kind].append(time.perf_counter() - start)
            return out

        setattr(module, name, timed)
    pl.seed_everything(0, verbose=False)
    train, val = shortcut_digits("corner_intensity", train_shortcut="planted", val_shortcut="planted", noise=0.25,
                                 seed=0)
    monitor = AttributionMonitor(methods=("saliency", "smoothgrad", "integrated_gradients"), probe_samples=20)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=pl.loggers.TensorBoardLogger(
        os.path.join("runs", "bench_render")), callbacks=[monitor], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsClassifier(), DataLoader(TensorDataset(train.x, train.y), batch_size=64, shuffle=True),
                    DataLoader(TensorDataset(val.x, val.y), batch_size=128))
    runs, seconds = next((r[1], r[2]) for r in cost.book(trainer).rows() if r[0] == monitor.cost_name())
    drawn, logged = sum(spent["draw"]), sum(spent["log"])
    print(f"\nAttributionMonitor on the demo ({epochs} epochs, 3 methods, 20 probe samples): {runs} runs, "
          f"{1000 * seconds / runs:.0f} ms per run;\n  drawing {len(spent['draw'])} figures: "
          f"{1000 * drawn / runs:.0f} ms per run ({1000 * drawn / len(spent['draw']):.1f} ms per figure), "
          f"{100 * drawn / seconds:.1f} % of the run;"
          f"\n  logging them (PNG encoding, TensorBoard's writer): {1000 * logged / runs:.0f} ms per run, "
          f"{100 * logged / seconds:.1f} % of the run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures(args.repeats)
    attribution_share(args.epochs)


if __name__ == "__main__":
    main()
