"""Pure cores import torch (and numpy) only: a fresh interpreter imports each and checks what got loaded.

The package root exports the callbacks lazily (PEP 562), so this imports the real package, as users do.
"""
import subprocess
import sys

import pytest

FORBIDDEN = ("lightning", "pytorch_lightning", "lightning_fabric", "tensorboard", "matplotlib", "captum")
CORES = ["lightning_xai.attribution", "lightning_xai.probes", "lightning_xai.featvis", "lightning_xai.shortcuts",
         "lightning_xai.samples", "lightning_xai.projections", "lightning_xai.text", "lightning_xai.text.synthetic",
         "lightning_xai._utils", "lightning_xai.datasets"]


@pytest.mark.parametrize("module", [pytest.param(m, id=m.split(".", 1)[1]) for m in CORES])
def test_core_loads_no_lightning_tensorboard_or_plotting(module):
    code = (f"import sys, {module}; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}); print(bad[:8])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{module} loaded {out.stdout.strip()}"


def test_callbacks_are_exported_lazily():
    code = ("import sys, lightning_xai; assert 'pytorch_lightning' not in sys.modules; "
            "from lightning_xai import AttributionMonitor, ShortcutMonitor; "
            "assert 'pytorch_lightning' in sys.modules; print(sorted(lightning_xai.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "FeatureVisMonitor" in out.stdout and "LinearProbeMonitor" in out.stdout
