"""Gemma 4 at real sizes, truncated (issue 19 item 8): E2B's first 6 layers and 26B-A4B's first 2, bfloat16,
through the port, hf and keras, in bounded memory. Minutes each and gigabytes of weights: never in the
default suite (marked slow, and run only with PARITY_REAL_SIZES=1):

    PARITY_REAL_SIZES=1 python -m pytest -q -p no:xdist -m slow tests/test_gemma4_real.py

Measured times and peaks: docs/real-sizes.md ("Gemma 4").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.model.presets import PRESETS
from parity.model.spec import truncate
from parity.model.weights import param_count

ROOT = Path(__file__).resolve().parents[1]
TORCH_IMPLS = ("litgpt-style", "hf")  # keras runs on JAX by default: its memory is not torch's
BOUND = 1.3  # a torch run's peak against its weights in the run's dtype
# measured over the bound (docs/real-sizes.md, "Gemma 4"): E2B's 1.9 GiB of weights beside transformers'
# 375 MiB of imports; hf peaks at 1.34x there. Remove when the per-layer table is read on demand.
OVER = {("gemma-4-e2b", "hf"): 1.36}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("PARITY_REAL_SIZES") != "1",
                       reason="real-size Gemma 4 runs take minutes and GBs: set PARITY_REAL_SIZES=1"),
]


@pytest.mark.parametrize("preset,layers", [("gemma-4-e2b", 6), ("gemma-4-26b-a4b", 2)])
def test_truncated_real_gemma4_in_bfloat16_passes_in_bounded_memory(preset, layers, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "parity.report", "--spec", preset, "--dtypes", "bfloat16",
           "--first-layers", str(layers), "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3 * 3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "PASS"
    weights_mb = param_count(truncate(PRESETS[preset], layers)) * 2 / 2**20  # bfloat16
    peaks = {r["impl"]: r["peak_rss_mb"] for r in report["runs"]
             if r["impl"] in TORCH_IMPLS and r["dtype"] == "bfloat16" and "peak_rss_mb" in r}
    assert set(peaks) == set(TORCH_IMPLS), report["runs"]  # each ran in its own process, its peak measured
    for impl, peak in peaks.items():
        assert peak <= OVER.get((preset, impl), BOUND) * weights_mb, (impl, peak, weights_mb)
