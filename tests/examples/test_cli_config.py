"""examples/config.yaml runs through examples/cli.py's LightningCLI on both Lightning packages, and every callback it
configures logs its images and scalars at every epoch."""
import os
import subprocess
import sys

import pytest

from helpers import PACKAGES, ROOT, lightning_package, read_events

EPOCHS = 2


def epoch_steps(acc):
    """``[(step, epoch)]`` from the ``epoch`` scalar Lightning logs with its own epoch-end metrics, by step."""
    return sorted({(int(e.step), int(e.value)) for e in acc.Scalars("epoch")})


def logged_epochs(acc, tag: str, kind: str = "scalars") -> list:
    """The epochs at which ``tag`` (a scalar or an image) was logged, one entry per event: each event's step is
    matched to the last epoch whose Lightning scalars were logged at or before it."""
    marks = epoch_steps(acc)
    events = acc.Scalars(tag) if kind == "scalars" else acc.Images(tag)
    return [max((epoch for step, epoch in marks if step <= e.step), default=-1) for e in events]


@pytest.mark.parametrize("package", PACKAGES)
def test_example_config_logs_every_epoch(tmp_path, package):
    lightning_package(package)  # skips when not installed
    cmd = [sys.executable, os.path.join(ROOT, "examples", "cli.py"), "fit",
           "--config", os.path.join(ROOT, "examples", "config.yaml"), f"--trainer.max_epochs={EPOCHS}",
           f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
           "--trainer.enable_checkpointing=false"]
    env = dict(os.environ, LIGHTNING_PACKAGE=package, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [dp for dp, _, files in os.walk(tmp_path) if any(f.startswith("events.out") for f in files)]
    assert len(runs) == 1, runs
    with open(os.path.join(runs[0], "config.yaml")) as saved:  # the logger came from the package that ran
        assert f"class_path: {package}.loggers.TensorBoardLogger" in saved.read()
    acc = read_events(runs[0])
    every_epoch = list(range(EPOCHS))
    for tag in ("xai/attribution/saliency", "xai/attribution/integrated_gradients", "xai/probe/heatmap"):
        assert logged_epochs(acc, tag, "images") == every_epoch, tag
    scalars = set(acc.Tags()["scalars"])
    probe_accuracies = sorted(t for t in scalars if t.startswith("xai/probe/") and t.endswith("/accuracy"))
    assert probe_accuracies
    for tag in ["xai/attribution/seconds", "xai/probe/seconds",
                "xai/attribution/integrated_gradients/completeness_gap"] + probe_accuracies:
        assert logged_epochs(acc, tag) == every_epoch, tag
    assert all(e.value > 0 for e in acc.Scalars("xai/attribution/seconds"))
    assert "lightning_xai: time spent explaining during fit" in proc.stdout
