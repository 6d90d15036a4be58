"""A CIFAR-sized fit for the overhead benchmark: data made here, a small CNN, the default callback stack, floors.

50,000 training and 10,000 validation images of 3x32x32 (``uint8`` in memory, 150 MB, as CIFAR-10 is; turned into
floats in ``[0, 1]`` one batch at a time), 10 classes. Each class has its own colour, its own grating orientation and
frequency and its own shape (disk or square) at a random place, under pixel noise, so the model learns something
(0.98 validation accuracy after one epoch: the task is easy, the cost is what matters here).

The model is a small CNN (three conv-BN-ReLU-pool blocks of 16, 32 and 64 channels, global average pooling, a linear
head), batch 128. The default stack (#24): AttributionMonitor (saliency, SmoothGrad, Integrated Gradients on 32 probe
samples), LinearProbeMonitor on two layers, ShortcutMonitor with one named region (the top-left 8x8 corner),
FeatureVisMonitor at its default cadence (every 5th epoch and at the end of fit); every other option at its default.

Used by ``bench/overhead.py``; ``python bench/cifar.py --child stack`` runs one fit in this process and prints its
peak resident memory (what ``bench/overhead.py`` starts in separate processes).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_xai import AttributionMonitor, FeatureVisMonitor, LinearProbeMonitor, ShortcutMonitor
from lightning_xai._fold import fold
from lightning_xai.callbacks import _cost as cost

SIDE, CLASSES, TRAIN, VAL, BATCH = 32, 10, 50_000, 10_000, 128
PROBE_LAYERS = ["net.1", "net.2"]  # the second and third block's outputs (32x8x8, 64x4x4)
REGION = {"corner": (0, 0, 8, 8)}
SIZES = {"train": TRAIN, "val": VAL}  # smaller with --train/--val, for a quick check of this script


def make_images(n: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``n`` images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)``, made in chunks (about 1 s for 60,000)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    y = y[torch.randperm(n, generator=g)]
    palette = torch.rand(CLASSES, 3, generator=torch.Generator().manual_seed(1234)) * 0.7 + 0.15  # (classes, 3)
    angle = torch.arange(CLASSES) * math.pi / CLASSES
    freq = 1.5 + (torch.arange(CLASSES) % 3).float()
    grid = (torch.arange(SIDE).float() + 0.5) / SIDE
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")  # (32, 32)
    out = torch.empty(n, 3, SIDE, SIDE, dtype=torch.uint8)
    for a in range(0, n, 4096):
        c = y[a:a + 4096]
        b = c.shape[0]
        phase = torch.rand(b, 1, 1, generator=g) * 2 * math.pi
        wave = torch.sin(2 * math.pi * freq[c].view(b, 1, 1) * (xx * angle[c].cos().view(b, 1, 1)
                                                                + yy * angle[c].sin().view(b, 1, 1)) + phase)
        colour = (palette[c] + 0.15 * torch.randn(b, 3, generator=g)).view(b, 3, 1, 1)
        img = colour * (0.55 + 0.35 * wave.unsqueeze(1))  # (b, 3, 32, 32)
        centre = torch.rand(b, 2, 1, 1, generator=g) * 0.6 + 0.2
        radius = torch.rand(b, 1, 1, generator=g) * 0.1 + 0.12
        dy, dx = yy - centre[:, 0], xx - centre[:, 1]
        disk = dy ** 2 + dx ** 2 <= radius ** 2
        square = torch.maximum(dy.abs(), dx.abs()) <= radius
        shape = torch.where((c % 2 == 0).view(b, 1, 1), disk, square).unsqueeze(1)  # (b, 1, 32, 32)
        img = torch.where(shape, 1.0 - colour, img)
        img = img + 0.25 * torch.randn(img.shape, generator=g)
        out[a:a + b] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out, y


class Images(Dataset):
    """uint8 images served as float batches in [0, 1] (one conversion per batch: ``__getitems__``)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i].float().div_(255), self.y[i]

    def __getitems__(self, idx: List[int]):
        idx = torch.as_tensor(idx)
        return self.x[idx].float().div_(255), self.y[idx]


def loaders(data) -> Tuple[DataLoader, DataLoader]:
    (xt, yt), (xv, yv) = data
    keep = lambda batch: batch  # noqa: E731 - __getitems__ already returns the batch
    return (DataLoader(Images(xt, yt), batch_size=BATCH, shuffle=True, collate_fn=keep),
            DataLoader(Images(xv, yv), batch_size=BATCH, collate_fn=keep))


def make_data(seed: int = 0):
    return make_images(SIZES["train"], seed), make_images(SIZES["val"], seed + 1)


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


class SmallCNN(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(block(3, 16), block(16, 32), block(32, 64),
                                 nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, CLASSES)))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def default_stack() -> list:
    return [AttributionMonitor(), LinearProbeMonitor(layers=PROBE_LAYERS), ShortcutMonitor(regions=REGION),
            FeatureVisMonitor()]


class PassTimer(pl.Callback):
    """Times one pass of the model at the end of each validation epoch, at its place in the callback list: placed
    between the stack's callbacks it prices each callback's floor within seconds of its run (the machine's speed
    drifts over minutes). Its own seconds are kept, to be taken out of the fit's."""

    def __init__(self) -> None:
        self.costs: List[Tuple[float, ...]] = []  # per sample: forward+backward, forward (wall), the same in CPU
        self.marks: List[Tuple[float, float]] = []  # process CPU time when it started and ended, per epoch
        # per epoch, per explaining callback (class name): its declared passes, runs so far and current run's seconds
        self.books: List[Dict[str, Tuple[Any, int, float]]] = []
        self.seconds = self.cpu = 0.0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        start, cpu = time.perf_counter(), time.process_time()
        book = cost.book(trainer)
        self.books.append({type(cb).__name__: (cb.estimated_passes(trainer), book.runs.get(id(cb), 0),
                                               book.current.get(id(cb), 0.0))
                           for cb in trainer.callbacks if id(cb) in book.names})
        training = pl_module.training
        images = getattr(getattr(trainer.val_dataloaders, "dataset", None), "x", None)  # uint8 validation images
        self.costs.append(pass_seconds(pl_module, repeats=3, images=images))
        pl_module.train(training)
        self.seconds += time.perf_counter() - start
        self.cpu += time.process_time() - cpu
        self.marks.append((cpu, time.process_time()))


def time_reports(cb: Any) -> None:
    """Keep the seconds ``cb.report`` takes (figures, text and scalars, and logging them: no model pass) in
    ``cb.report_seconds``."""
    report, cb.report_seconds = cb.report, 0.0

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return report(*args, **kwargs)
        finally:
            cb.report_seconds += time.perf_counter() - start

    cb.report = timed


def timed_stack() -> Tuple[list, List[PassTimer]]:
    """The default stack with a :class:`PassTimer` before the first callback and after each one, and each callback's
    report timed (:func:`time_reports`)."""
    timers = [PassTimer() for _ in range(5)]
    stack = default_stack()
    for cb in stack:
        time_reports(cb)
    return [timers[0]] + [c for cb, t in zip(stack, timers[1:]) for c in (cb, t)], timers


def declared_runs(name: str, before: PassTimer, after: PassTimer, folds: bool = False) -> Dict[str, Any]:
    """A callback's runs as the timers around it saw them at each validation epoch's end: the passes it declared
    just before its run (``estimated_passes`` at that moment: LinearProbeMonitor's differ between runs), the run's
    seconds (cost book), and the floor of each run: its forwards priced at the forward and its forward+backward
    passes at the forward+backward the two timers measured then, in wall time and in CPU time; and at the price
    its passes run at here: channels-last, on the folded model when it ``folds`` (its ``folds_model()``)."""
    declared, seconds, floors, cpu_floors, cl_floors, fast_floors = [], [], [], [], [], []
    runs = 0
    for b, a, cb, ca in zip(before.books, after.books, before.costs, after.costs):
        work, _, _ = b[name]
        _, now, current = a[name]
        if now > runs:  # it ran in this epoch
            declared.append(work)
            seconds.append(current)
            if work is not None:
                # forward+backward, forward; the same in CPU; the same in wall time in channels-last layout
                price = [(x + y) / 2 for x, y in zip(cb, ca)]
                floors.append(work.gradient * price[0] + work.forward * price[1])
                cpu_floors.append(work.gradient * price[2] + work.forward * price[3])
                cl_floors.append(work.gradient * price[4] + work.forward * price[5])
                fast_floors.append(work.gradient * price[6] + work.forward * price[7] if folds else cl_floors[-1])
        runs = now
    return {"declared": declared, "run_seconds": seconds, "floors": floors, "cpu_floors": cpu_floors,
            "cl_floors": cl_floors, "fast_floors": fast_floors}


class TrainClock(pl.Callback):
    """Wall seconds inside the training batches (forward, backward, optimiser step), summed: the same work in a fit
    with callbacks and one without, so a difference is the callbacks' effect on training itself."""

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._start


def fit(callbacks: list, epochs: int, data, limit_train_batches: Any = None) -> Dict[str, Any]:
    """One fit: wall seconds, the model, and per callback (class name) its runs, seconds and declared work."""
    pl.seed_everything(0, verbose=False)
    clock = TrainClock()
    callbacks = [clock] + list(callbacks)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
                         limit_train_batches=limit_train_batches,
                         logger=TensorBoardLogger(tempfile.mkdtemp(prefix="xai-cifar-")
                                                  ),  # images encoded as in a real run
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    model = SmallCNN()
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, *loaders(data))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    book = cost.book(trainer)
    spent = {type(cb).__name__: {"runs": book.runs.get(id(cb), 0), "seconds": book.seconds.get(id(cb), 0.0),
                                 "work": cb.estimated_passes(trainer), "report": getattr(cb, "report_seconds", None)}
             for cb in trainer.callbacks if id(cb) in book.names}
    for i, cb in enumerate(callbacks):  # with timers around it: the passes it declared at each run, and the runs
        if id(cb) in book.names and 0 < i < len(callbacks) - 1 and isinstance(callbacks[i - 1], PassTimer) \
                and isinstance(callbacks[i + 1], PassTimer):
            spent[type(cb).__name__].update(declared_runs(type(cb).__name__, callbacks[i - 1], callbacks[i + 1],
                                                          folds=cb.folds_model()))
    return {"seconds": seconds, "cpu": cpu, "model": model, "spent": spent, "callbacks": callbacks[1:],
            "train_seconds": clock.seconds,
            "val_acc": float(trainer.callback_metrics.get("val_acc", float("nan"))),
            "load": (load, os.getloadavg()[0])}


def pass_seconds(model: nn.Module, rows: int = BATCH, repeats: int = 7,
                 images: Optional[Tensor] = None) -> Tuple[float, ...]:
    """Seconds per sample of one forward+backward (the input gradient, as saliency takes it) and of one forward under
    ``no_grad``, eval mode, ``rows`` per pass, in wall time and in process CPU time; then the same two in wall time
    with the input in channels-last layout (what the callbacks' passes may run in, see lightning_xai._layout); then
    the same two on the model with its BatchNorms folded into its convolutions, in channels-last layout (what the
    image callbacks' passes run on, see lightning_xai._fold; the model's own passes where nothing folds): medians
    over ``repeats``.

    ``images``: the inputs (their first ``rows``), else uniform noise. The cost depends on the values: max-pooling
    compares and branches, and on this CPU pools uniform noise about a fifth slower than the model's own images, so
    the floors are priced on validation images, what the callbacks pass."""
    model.eval()
    x = images[:rows].float() / 255 if images is not None else torch.rand(rows, 3, SIDE, SIDE)
    folded = fold(model)
    folded = model if folded is None else folded.module
    # fb, fw, fb CPU, fw CPU, fb channels-last, fw channels-last, fb folded channels-last, fw folded channels-last
    times: List[List[float]] = [[] for _ in range(8)]
    for _ in range(repeats + 1):
        for net, layout, (fb, fw, fb_cpu, fw_cpu) in ((model, torch.contiguous_format, (0, 1, 2, 3)),
                                                      (model, torch.channels_last, (4, 5, None, None)),
                                                      (folded, torch.channels_last, (6, 7, None, None))):
            inputs = x.contiguous(memory_format=layout)
            t, c = time.perf_counter(), time.process_time()
            with torch.enable_grad():
                xi = inputs.clone(memory_format=layout).requires_grad_(True)
                out = net(xi)
                torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), xi)
            times[fb].append(time.perf_counter() - t)
            if fb_cpu is not None:
                times[fb_cpu].append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            with torch.no_grad():
                net(inputs)
            times[fw].append(time.perf_counter() - t)
            if fw_cpu is not None:
                times[fw_cpu].append(time.process_time() - c)
    return tuple(statistics.median(v[1:]) / rows for v in times)


def peak_kb() -> int:
    """This process' peak resident memory in kB: Linux's ``VmHWM``. (``ru_maxrss`` will not do in a child: Linux keeps
    it across ``execve``, so a child started by a process holding the data would report the parent's peak.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(which: str, epochs: int, limit: int) -> None:
    """One fit in this process (``limit`` training batches per epoch); prints the peak resident memory (kB) during
    the fit as JSON: the peak is reset once the data is made (Linux: ``5`` written to ``/proc/self/clear_refs``), so
    making the data, whose float intermediates peak higher than the fit without callbacks, does not hide the fit's;
    glibc's free heap is first returned to the system, or it decides, by chance, where each child starts (±100 MB)."""
    data = make_data()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap back to the OS: every child starts the fit at the same RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = peak_kb()
    out = fit(default_stack() if which == "stack" else [], epochs, data, limit_train_batches=limit)
    print(json.dumps({"which": which, "maxrss_kb": peak_kb(), "before_kb": before, "seconds": out["seconds"]}))


def peak_rss(which: str, epochs: int, limit: int) -> Tuple[int, float, int]:
    """Peak resident memory (kB) during one fit in a fresh child process, its seconds, and the memory it started at."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--epochs", str(epochs), "--limit", str(limit),
           "--train", str(SIZES["train"]), "--val", str(SIZES["val"])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return int(got["maxrss_kb"]), float(got["seconds"]), int(got["before_kb"])


def measure(rounds: int, epochs: int, rss_rounds: int, rss_limit: int, plain_fits: bool = True) -> Dict[str, Any]:
    """The CIFAR-sized case: ``rounds`` pairs of fits (no callbacks / the default stack), interleaved in this process
    with the order reversed every other round; after each stack fit, the cost of one pass of the model it trained;
    then ``rss_rounds`` pairs of fits in child processes for peak memory (``rss_limit`` training batches per epoch:
    the data, model, validation pass and every callback run are the same, and training batches hold no memory
    beyond their own step)."""
    data = make_data()
    warm = loaders(data)[0]
    fit_model = SmallCNN()
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(fit_model, warm)  # warm-up: allocator, thread pool
    plain, stack = [], []
    for r in range(rounds):
        for which in (("none", "stack") if r % 2 == 0 else ("stack", "none")) if plain_fits else ("stack",):
            callbacks, timers = timed_stack() if which == "stack" else ([], [])
            out = fit(callbacks, epochs, data)
            if which == "stack":
                out["seconds"] -= sum(t.seconds for t in timers)  # the timers' own passes are not the stack's
                out["cpu"] -= sum(t.cpu for t in timers)
                out["timers"] = [t.costs for t in timers]  # per timer, per validation epoch
                # CPU seconds of each callback's epoch-end work: between the timer before it and the one after it
                out["cpu_spent"] = {type(cb).__name__: sum(b[0] - a[1] for a, b in zip(t0.marks, t1.marks))
                                    for cb, t0, t1 in zip(callbacks[1::2], timers, timers[1:])}
                out["pass"] = tuple(statistics.median(c[i] for t in timers for c in t.costs) for i in range(6))
                stack.append(out)
            else:
                plain.append(out)
            print(f"# round {r} {which}: {out['seconds']:.1f} s, load average (1 min) {out['load'][0]:.1f} at the "
                  f"start, {out['load'][1]:.1f} at the end", flush=True)
        out["model"] = None
        report({"plain": plain, "stack": stack, "rss": [], "epochs": epochs})  # so far
        for s in stack:
            s["model"] = None
    rss = []
    for r in range(rss_rounds):
        pair = {which: peak_rss(which, epochs, rss_limit)
                for which in (("none", "stack") if r % 2 == 0 else ("stack", "none"))}
        rss.append(pair)
        print(f"# rss round {r}: {pair}", flush=True)
    return {"plain": plain, "stack": stack, "rss": rss, "epochs": epochs, "rss_limit": rss_limit}


def report(res: Dict[str, Any]) -> None:
    if res["stack"]:
        report_time(res)
    if res["rss"]:
        report_memory(res)


def report_time(res: Dict[str, Any]) -> None:
    plain, stack, epochs = res["plain"], res["stack"], res["epochs"]
    ratios = [s["seconds"] / p["seconds"] for s, p in zip(stack, plain)]
    print(f"\nCIFAR-sized fit: {SIZES['train']:,} training and {SIZES['val']:,} validation images of "
          f"3x{SIDE}x{SIDE}, small CNN, batch {BATCH}, {epochs} epoch(s), {torch.get_num_threads()} threads; "
          + (f"{len(ratios)} rounds, each a fit without callbacks and one with the default stack, interleaved (order "
             f"reversed every other round); validation accuracy after the fit "
             f"{statistics.median(p['val_acc'] for p in plain):.3f}.\n" if plain else
             f"{len(stack)} fits with the default stack only (--no-plain); validation accuracy after the fit "
             f"{statistics.median(s['val_acc'] for s in stack):.3f}.\n"))
    if plain:
        print("| callbacks | fit seconds (median) | / no callbacks (median of the rounds' ratios) | rounds' ratios |")
        print("|---|---:|---:|---|")
        print(f"| none | {statistics.median(p['seconds'] for p in plain):.1f} | 1.000 | – |")
        print(f"| default stack | {statistics.median(s['seconds'] for s in stack):.1f} | "
              f"**{statistics.median(ratios):.3f}** | {', '.join(f'{r:.3f}' for r in ratios)} |")
        print("\nLoad average (1 min, 2 cores) at the start and end of each fit, per round (plain; stack): "
              + "; ".join(f"{p['load'][0]:.1f}-{p['load'][1]:.1f}, {s['load'][0]:.1f}-{s['load'][1]:.1f}"
                          for p, s in zip(plain, stack)) + ".")
        train = [s["train_seconds"] / p["train_seconds"] for s, p in zip(stack, plain)]
        print(f"\nTraining batches alone (forward, backward, optimiser step; the same work in both fits), stack / "
              f"plain, per round: {', '.join(f'{r:.3f}' for r in train)} (median **{statistics.median(train):.3f}**; "
              f"plain {statistics.median(p['train_seconds'] for p in plain):.1f} s).")
        cpu = [s["cpu"] / p["cpu"] for s, p in zip(stack, plain)]
        print(f"\nThe same in process CPU time (user + system, both threads; what other jobs on the machine take "
              f"barely moves it): plain fit {statistics.median(p['cpu'] for p in plain):.1f} s, "
              f"stack {statistics.median(s['cpu'] for s in stack):.1f} s, "
              f"ratio **{statistics.median(cpu):.3f}** ({', '.join(f'{r:.3f}' for r in cpu)}).")
    else:
        fits = ", ".join(f"{s['seconds']:.1f} s" for s in stack)
        print(f"Stack fits: {fits}; load average (1 min, 2 cores) "
              "at the start and end of each: " + "; ".join(f"{s['load'][0]:.1f}-{s['load'][1]:.1f}" for s in stack)
              + ".")
    # within one fit: its time over its time without the explaining the cost book charged (drift between fits cancels)
    within = [s["seconds"] / (s["seconds"] - sum(v["seconds"] for v in s["spent"].values())) for s in stack]
    print(f"\nWithin each stack fit, fit time / (fit time - the cost book's explaining seconds): "
          f"**{statistics.median(within):.3f}** ({', '.join(f'{r:.3f}' for r in within)}).")
    names = list(stack[0]["spent"])
    print("\nEach callback, median over the fits: seconds per run (cost book: all its seconds, one-off ones such as "
          "LinearProbeMonitor's copy of the model included, over its runs), the report's seconds (figures, text, "
          "scalars and logging them: no model pass), the median run (the cost book's seconds of each run), share of "
          "the plain fit (its seconds / the same round's fit without callbacks), and its floor: the passes it "
          "declared at each run (estimated_passes just before it: forwards alone, and forward+backward passes), "
          "each priced at the cost of one such pass per sample of the model (eval mode, 128 rows; the backward to "
          "the input), timed in the same fit just before and just after the callback's run (the timers' own time is "
          "taken out of the stack's fit time).\n")
    print("The floor is priced in the model's own layout (NCHW, as the fit runs it). The callbacks may run their "
          "passes in channels-last layout (lightning_xai._layout), which is faster on this CNN; the last two columns "
          "price the same passes in channels-last, the stricter floor; the two after them at the price the passes "
          "run at here: channels-last, on the model with its BatchNorms folded for the callbacks that fold "
          "(lightning_xai._fold; LinearProbeMonitor reads layers and does not).\n")
    print("| callback | runs | seconds per run | of which report | median run | share of the plain fit "
          "| declared passes per run (forwards + forward+backward) | floor per run (s) | run / floor "
          "| (run - report) / floor | channels-last floor per run (s) | run / channels-last floor "
          "| floor at the price run (s) | run / that floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    steady = 0.0
    for name in names:
        got = [s["spent"][name] for s in stack]
        runs = got[0]["runs"]
        per_run = statistics.median(g["seconds"] / max(g["runs"], 1) for g in got)
        median_run = statistics.median(statistics.median(g["run_seconds"]) if g.get("run_seconds") else
                                       g["seconds"] / max(g["runs"], 1) for g in got)
        share = "–" if not plain else "{:.1f} %".format(100 * statistics.median(
            g["seconds"] / p["seconds"] for g, p in zip(got, plain)))
        reports = [(g["report"] or 0.0) / max(g["runs"], 1) for g in got]
        floor_ratio = floor = rest_ratio = work_txt = cl_floor = cl_ratio = fast_floor = fast_ratio = "–"
        if all(g.get("declared") and None not in g["declared"] for g in got):
            fast = [sum(g["fast_floors"]) / max(g["runs"], 1) for g in got]
            fast_floor = f"{statistics.median(fast):.2f}"
            if min(fast) > 0:
                fast_ratio = "{:.2f}".format(statistics.median(
                    g["seconds"] / max(g["runs"], 1) / f for g, f in zip(got, fast)))
            cl_floors = [sum(g["cl_floors"]) / max(g["runs"], 1) for g in got]
            cl_floor = f"{statistics.median(cl_floors):.2f}"
            if min(cl_floors) > 0:
                cl_ratio = "{:.2f}".format(statistics.median(
                    g["seconds"] / max(g["runs"], 1) / f for g, f in zip(got, cl_floors)))
            floors = [sum(g["floors"]) / max(g["runs"], 1) for g in got]  # per run, each run at its own price
            fwd = statistics.median(sum(d.forward for d in g["declared"]) / max(g["runs"], 1) for g in got)
            grad = statistics.median(sum(d.gradient for d in g["declared"]) / max(g["runs"], 1) for g in got)
            work_txt = f"{fwd:,.0f} + {grad:,.0f}"
            floor = f"{statistics.median(floors):.2f}"
            if min(floors) > 0:
                floor_ratio = "**{:.2f}**".format(statistics.median(
                    g["seconds"] / max(g["runs"], 1) / f for g, f in zip(got, floors)))
                rest_ratio = "{:.2f}".format(statistics.median(
                    (g["seconds"] / max(g["runs"], 1) - r) / f for g, r, f in zip(got, reports, floors)))
        print(f"| {name} | {runs} | {per_run:.2f} | {statistics.median(reports):.2f} | {median_run:.2f} | {share} | "
              f"{work_txt} | {floor} | {floor_ratio} | {rest_ratio} | {cl_floor} | {cl_ratio} | {fast_floor} | "
              f"{fast_ratio} |")
        every = 5 if name == "FeatureVisMonitor" else 1
        steady += median_run / every
    if all(g.get("fast_floors") is not None and None not in g.get("declared", [None]) for s in stack
           for g in s["spent"].values()):
        parts = {"passes": [sum(sum(g["fast_floors"]) for g in s["spent"].values()) for s in stack],
                 "reports": [sum(g["report"] or 0.0 for g in s["spent"].values()) for s in stack],
                 "all": [sum(g["seconds"] for g in s["spent"].values()) for s in stack]}
        base = [p["seconds"] for p in plain] if plain else \
            [s["seconds"] - a for s, a in zip(stack, parts["all"])]
        share = {k: statistics.median(100 * v / b for v, b in zip(vals, base)) for k, vals in parts.items()}
        print("\nWhere the whole fit's explaining goes (median over the stack fits, as a share of "
              + ("the same round's fit without callbacks" if plain else "the stack fit without its explaining")
              + f"): every callback's declared passes at the price they run at (the last floor above) "
              f"{statistics.median(parts['passes']):.1f} s = **{share['passes']:.1f} %**; the reports "
              f"{statistics.median(parts['reports']):.1f} s = {share['reports']:.1f} %; everything else (plans, "
              f"checks, copies, capturing, small batches) {share['all'] - share['passes'] - share['reports']:.1f} %; "
              f"in all {statistics.median(parts['all']):.1f} s = {share['all']:.1f} %.")
    print("\nIn CPU time: each callback's epoch-end work (between the timers around it; LinearProbeMonitor's capture "
          "and untrained forward during the validation batches are not in it) against its floor in CPU time.\n")
    print("| callback | CPU seconds per run | share of the plain fit's CPU | floor (CPU s) | run / floor |")
    print("|---|---:|---:|---:|---:|")
    for i, name in enumerate(names):
        runs = [max(s["spent"][name]["runs"], 1) for s in stack]
        per_run = [s["cpu_spent"][name] / r for s, r in zip(stack, runs)]
        work = [s["spent"][name].get("declared") for s in stack]
        if any(not w or None in w for w in work):
            continue
        floors = [sum(s["spent"][name]["cpu_floors"]) / r for s, r in zip(stack, runs)]
        share = "–" if not plain else "{:.1f} %".format(100 * statistics.median(
            s["cpu_spent"][name] / p["cpu"] for s, p in zip(stack, plain)))
        ratio = "–" if min(floors) <= 0 else \
            f"**{statistics.median(r / f for r, f in zip(per_run, floors)):.2f}**"
        print(f"| {name} | {statistics.median(per_run):.2f} | {share} | {statistics.median(floors):.2f} | "
              f"{ratio} |")
    if plain:
        epoch = statistics.median(p["seconds"] for p in plain) / epochs
    else:  # the stack fit without the explaining
        epoch = statistics.median(s["seconds"] - sum(v["seconds"] for v in s["spent"].values()) for s in stack) / epochs
    fb = statistics.median(s["pass"][0] for s in stack) * 1e3
    fw = statistics.median(s["pass"][1] for s in stack) * 1e3
    spread_fb = [c[0] * 1e3 for s in stack for t in s["timers"] for c in t]
    print(f"\nOne pass of the model: forward+backward {fb:.3f} ms per sample (median; {min(spread_fb):.3f}-"
          f"{max(spread_fb):.3f} ms over the fits' timers), forward alone {fw:.3f} ms ({fw / fb:.2f} of a "
          "forward+backward). In channels-last layout: forward+backward {:.3f} ms, forward {:.3f} ms.".format(
              *(statistics.median(s["pass"][i] for s in stack) * 1e3 for i in (4, 5))))
    if epochs < 3:  # a median run would be a first one (LinearProbeMonitor's untrained baseline, plans, scales)
        print("Per epoch of a long fit: needs three epochs or more (each callback's median run is then a steady one).")
        return
    print(f"Per epoch of a long fit at the default cadences (every callback every epoch, FeatureVisMonitor every 5th; "
          f"each callback's median run): {steady:.1f} s of explaining per {epoch:.1f} s epoch "
          + ("" if plain else "(the stack fit's own, without its explaining) ") + f"= **{1 + steady / epoch:.3f}x**.")
    floors = 0.0
    for name in names:
        got = [s["spent"][name] for s in stack]
        if all(g.get("floors") for g in got):
            every = 5 if name == "FeatureVisMonitor" else 1
            floors += statistics.median(statistics.median(g["floors"]) for g in got) / every
    print(f"The same at every callback's median floor instead of its median run (the defaults' work alone, as if "
          f"each callback cost exactly its declared passes): {floors:.1f} s = **{1 + floors / epoch:.3f}x**.")


def report_memory(res: Dict[str, Any]) -> None:
    epochs = res["epochs"]
    if res["rss"]:
        ratio = statistics.median(pr["stack"][0] / pr["none"][0] for pr in res["rss"])
        print(f"\nPeak resident memory (VmHWM) of fits in child processes, {len(res['rss'])} pair(s), "
              f"{epochs} epoch(s) of {res['rss_limit']} training batches (the whole validation set, every callback "
              "run):\n")
        print("| callbacks | RSS when the fit starts (MiB) | peak RSS during the fit (MiB) |")
        print("|---|---:|---:|")
        for which, label in (("none", "none"), ("stack", "default stack")):
            print(f"| {label} | {statistics.median(pr[which][2] for pr in res['rss']) / 1024:.0f} | "
                  f"{statistics.median(pr[which][0] for pr in res['rss']) / 1024:.0f} |")
        print(f"\nPeak RSS ratio: **{ratio:.3f}**")


def untrained_stop(rounds: int) -> None:
    """LinearProbeMonitor on the first block only: its first run (the untrained copy's forward over the validation
    set, ended after that block) against the same with the copy's whole forward (``ActivationCapture.stopping``
    made inert), in alternating one-epoch fits; the baselines must agree."""
    import contextlib

    from lightning_xai.probes import _capture

    data = make_data()
    stopping = _capture.ActivationCapture.stopping
    seconds: Dict[str, List[float]] = {"ended after the block": [], "whole forward": []}
    try:
        for _ in range(rounds):
            for label in seconds:
                _capture.ActivationCapture.stopping = stopping if label.startswith("ended") else (
                    lambda self, rows: contextlib.nullcontext())
                cb = LinearProbeMonitor(layers=["net.0"])
                out = fit([cb], 1, data)
                seconds[label].append(out["spent"]["LinearProbeMonitor"]["seconds"])
                print(f"# {label}: {seconds[label][-1]:.2f} s, untrained baseline accuracy "
                      f"{cb.baselines['untrained/net.0']['accuracy']:.4f}", flush=True)
    finally:
        _capture.ActivationCapture.stopping = stopping
    for label, values in seconds.items():
        print(f"LinearProbeMonitor(layers=['net.0']), one-epoch fit, {label}: median {statistics.median(values):.2f} s "
              f"({', '.join(f'{v:.2f}' for v in values)})")


def main(argv=None) -> None:
    import logging
    import warnings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=("none", "stack"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rss-rounds", type=int, default=1)
    parser.add_argument("--rss-limit", type=int, default=40, help="training batches per epoch of the memory fits")
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)  # a child's training batches
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-plain", action="store_true",
                        help="fit with the stack only (the within-fit ratio and the callbacks' floors need no other)")
    parser.add_argument("--train", type=int, default=TRAIN)
    parser.add_argument("--val", type=int, default=VAL)
    parser.add_argument("--untrained-stop", action="store_true",
                        help="LinearProbeMonitor's untrained baseline on the first block, ended there or not")
    args = parser.parse_args(argv)
    SIZES.update(train=args.train, val=args.val)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_xai").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.epochs, args.limit)
        return
    if args.untrained_stop:
        untrained_stop(args.rounds)
        return
    report(measure(args.rounds, args.epochs, args.rss_rounds, args.rss_limit, plain_fits=not args.no_plain))


if __name__ == "__main__":
    main()
