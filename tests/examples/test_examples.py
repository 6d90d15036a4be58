"""The examples print, per epoch, the figures computed at that epoch: each printed number is the value logged to
TensorBoard at that epoch, and "-" stands where nothing was logged then (``--every 2``: epoch 1 is not explained).
A row that repeated an earlier epoch's values (``trainer.callback_metrics`` keeps them) fails here."""
import math
import os
import subprocess
import sys

import pytest

from helpers import ROOT, read_events
from test_cli_config import logged_epochs

sys.path.insert(0, os.path.join(ROOT, "examples"))
from all_callbacks import COLUMNS  # noqa: E402
from text_spurious_token import FIGURES  # noqa: E402

EPOCHS, EVERY = 3, 2  # explained at epochs 0 and 2 (the last), not at 1


def run_example(tmp_path, script: str, *args: str) -> str:
    cmd = [sys.executable, os.path.join(ROOT, "examples", script), "--logdir", str(tmp_path / "runs"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def event_dir(tmp_path) -> str:
    runs = [dp for dp, _, files in os.walk(tmp_path / "runs") if any(f.startswith("events.out") for f in files)]
    assert len(runs) == 1, runs
    return runs[0]


def check_printed(acc, epoch: int, tag: str, printed: str) -> None:
    """``printed`` (a number, or "-") is what ``tag`` logged at ``epoch``."""
    values = [e.value for e, at in zip(acc.Scalars(tag), logged_epochs(acc, tag)) if at == epoch]
    assert len(values) <= 1, (tag, epoch, values)
    if printed == "-":
        assert not values or math.isnan(values[0]), f"{tag} was logged at epoch {epoch} ({values}) but printed as -"
        return
    assert values, f"{tag} printed as {printed} at epoch {epoch}, but nothing was logged at that epoch"
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert abs(float(printed) - values[0]) <= 0.6 * 10 ** -decimals, (tag, epoch, printed, values[0])


@pytest.mark.slow
def test_all_callbacks_prints_each_epochs_own_figures(tmp_path):
    out = run_example(tmp_path, "all_callbacks.py", "--epochs", str(EPOCHS), "--every", str(EVERY),
                      "--limit-batches", "2", "--threads", "1")
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["epoch", "val", "acc"]) + 1
    rows = [line.split() for line in lines[start:start + EPOCHS]]
    assert [int(r[0]) for r in rows] == list(range(EPOCHS)), rows
    acc = read_events(event_dir(tmp_path))
    for epoch, row in enumerate(rows):
        assert len(row) == 1 + len(COLUMNS), row
        for (title, tag, _), printed in zip(COLUMNS, row[1:]):
            explained = tag == "val_acc" or epoch % EVERY == 0 or epoch == EPOCHS - 1
            assert (printed != "-") == explained, (epoch, title, printed)
            check_printed(acc, epoch, tag, printed)


def test_text_example_prints_each_epochs_own_figures(tmp_path):
    out = run_example(tmp_path, "text_spurious_token.py", "--epochs", str(EPOCHS), "--every", str(EVERY))
    rows = [line for line in out.splitlines() if line.startswith("epoch ") and ": " in line]
    assert [int(line.split(":")[0].split()[1]) for line in rows] == list(range(EPOCHS)), rows
    acc = read_events(event_dir(tmp_path))
    for epoch, line in enumerate(rows):
        items = dict(item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split("  "))
        assert list(items) == [label for label, _ in FIGURES], items
        for label, tag in FIGURES:
            explained = not tag.startswith("xai/") or epoch % EVERY == 0 or epoch == EPOCHS - 1
            assert (items[label] != "-") == explained, (epoch, label, items[label])
            check_printed(acc, epoch, tag, items[label])
