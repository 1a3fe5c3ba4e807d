"""Quantized runs' saved traces and per-run resources: what `--save-traces` keeps must re-judge to the live verdict
(held references included), and each separate run reports its own peak memory."""

from __future__ import annotations

import numpy as np

from parity.capture.runner import capture_in_subprocess, own_peak_rss_mb
from parity.model.presets import resolve_spec
from parity.model.weights import random_weights


def test_separate_run_peak_is_its_own_not_the_parents():
    """Linux carries a forked child's peak (the parent's memory) across exec into wait4's maxrss: a small run
    captured after the report process once held 700 MiB read at least 700 MiB. Its own VmHWM is far below."""
    spec = resolve_spec("tiny-gemma2")
    w = random_weights(spec, 0)
    big = np.ones(700 * 1024 * 1024 // 8)  # touched: 700 MiB resident in this process, then given back
    del big
    parent = own_peak_rss_mb()
    assert parent > 700
    got = capture_in_subprocess("litgpt-style", spec, w, "float32", {"p": [1, 2, 3, 4]})
    peak = got[0].resources["peak_rss_mb"]
    assert 20 < peak < parent - 200, (peak, parent)  # python, numpy and the port's imports, not this process's peak
