"""Sharded models: every callback under Lightning's ModelParallelStrategy (FSDP2 ``fully_shard``) with 2 CPU
processes over gloo. Every rank takes part in every pass of an explanation, in lockstep, so the fit neither hangs
nor fails, and the figures equal those of the same model in one process.

The fits run as subprocesses of ``tests/sharded_fit.py`` (the strategy starts rank 1 by re-running the script),
with a timeout so that a hang fails the test.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import TESTS, lightning_package

HERE = TESTS  # sharded_fit.py, the script each fit runs
needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _run(out, devices: int):
    lightning_package("lightning.pytorch")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_fit.py"), str(out), str(devices)],
                          capture_output=True, text=True, timeout=420, env=env, cwd=str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


@needs_gloo
@pytest.mark.slow
def test_every_callback_explains_a_sharded_model_in_lockstep(tmp_path):
    """Attribution (saliency, IG, occlusion, LIME, Grad-CAM on 7 probe samples), linear probes, named-region and
    discovery shortcut checks, feature visualisation (one objective inside a sharded unit), sample influence and
    projections, together in one fit."""
    (single,) = _run(tmp_path / "single", 1)
    ranks = _run(tmp_path / "sharded", 2)
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(single["explained"]) == 7
    for r in ranks:
        assert r["explained"] == single["explained"] and set(single["explained"].values()) == {1}
        assert set(r["errors"].values()) == {0}
    assert ranks[0]["forwards"] == ranks[1]["forwards"]  # lockstep: the same passes on both ranks
    assert single["metrics"], "the callbacks logged no scalar"
    prefixes = {k.split("/")[0] + "/" + k.split("/")[1] for k in single["metrics"]}
    assert {"xai/attribution", "xai/probe", "xai/shortcut", "discovery/shortcut", "xai/featvis", "xai/samples",
            "xai/projection"} <= prefixes
    for key, value in single["metrics"].items():
        for rank, r in enumerate(ranks):
            assert r["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), (rank, key)


def test_unsupported_sharded_strategies_are_refused_with_the_supported_ones_named():
    from types import SimpleNamespace

    from lightning_xai import AttributionMonitor
    from lightning_xai._lightning import MisconfigurationException

    lightning = lightning_package("lightning.pytorch")
    fsdp1 = lightning.strategies.FSDPStrategy.__new__(lightning.strategies.FSDPStrategy)  # GPU-only here
    trainer = SimpleNamespace(strategy=fsdp1, precision="32-true", world_size=1, global_rank=0)
    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy"):
        AttributionMonitor().setup(trainer, None, "fit")
