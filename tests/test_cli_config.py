"""Every callback can be configured from a LightningCLI YAML file (examples/config.yaml)."""
import os
import subprocess
import sys

from helpers import read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_config_runs_and_logs(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "cli.py"), "fit", "--config", os.path.join(ROOT, "examples", "config.yaml"),
           "--trainer.max_epochs=1", f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [os.path.join(dp) for dp, _, files in os.walk(tmp_path) if any(f.startswith("events.out") for f in files)]
    assert runs
    acc = read_events(runs[0])
    images = set(acc.Tags()["images"])
    scalars = set(acc.Tags()["scalars"])
    assert "xai/attribution/saliency" in images
    assert any(t.startswith("xai/probe/") for t in scalars)
