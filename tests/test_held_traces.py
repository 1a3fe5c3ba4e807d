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


def _report(argv: list[str], out) -> tuple[int, dict]:
    import json

    from parity.report.cli import main

    rc = main([*argv, "--out", str(out), "--quiet"])
    return rc, json.loads((out / "report.json").read_text())


def _judged(report: dict) -> tuple:
    """What must not change between a live run and its saved traces re-judged: the verdict per run, every tap's
    outcome and statistic, the quantization section and which reference each quantized run was judged against."""
    taps = sorted((t["impl"], t["dtype"], t["mode"], t["prompt"], t["tap"], t["passed"], t["stat"], t["basis"])
                  for t in report["taps"])
    verdicts = [(v["impl"], v["dtype"], v["mode"], v["status"], v["passed_taps"]) for v in report["verdicts"]]
    causes = sorted((d["impl"], d["dtype"], d["cause"], d["severity"], d["tap"]) for d in report["diagnosis"])
    return report["status"], verdicts, taps, report["quant"], report["held"], causes


def test_saved_traces_of_a_quantized_run_rejudge_to_the_live_verdict(tmp_path):
    """llama.cpp q4_0 is judged against the port on its own dequantized weights (its honest members rounding
    activations to q8_0, as its kernels do). Its saved traces re-judged with --trace must meet that same reference
    and noise, and give the same quant section; judged against the given weights' reference it fails."""
    import pytest

    pytest.importorskip("llama_cpp")
    live_rc, live = _report(["--spec", "tiny-gemma2", "--impls", "llama-cpp-q4_0", "--dtypes", "float32",
                             "--save-traces"], tmp_path / "live")
    assert live["quant"] and live["held"]
    files = sorted(str(f) for f in (tmp_path / "live" / "traces").rglob("*.safetensors"))
    assert any("/held-" in f for f in files)  # the held reference is saved, in its own subfolder
    # passed in another order than the live run's prompts: the numbers must not depend on it
    again_rc, again = _report([x for f in reversed(files) for x in ("--trace", f)], tmp_path / "again")
    assert (again_rc, _judged(again)) == (live_rc, _judged(live))
    # without the held reference (traces saved before it was written) the same run is judged on the given weights:
    # a different verdict, and no quantization section
    plain = [f for f in files if "/held-" not in f]
    _, wrong = _report([x for f in plain for x in ("--trace", f)], tmp_path / "wrong")
    assert _judged(wrong) != _judged(live) and not wrong["quant"]


def test_ort_genai_held_weights_are_dequantized_when_read_not_held_whole():
    """onnxruntime-genai's held weights read from its built int4 model keep only the graph and the codes' reader:
    each float32 tensor is dequantized when asked (as llama.cpp's are), so at real sizes the whole dequantized
    model (10 GiB peak for gemma-2b's first 4 layers before) is never in memory at once."""
    import tracemalloc

    import pytest

    pytest.importorskip("onnxruntime_genai")
    from parity.adapters import get_adapter
    from parity.adapters.held_tensors import HeldTensors
    from parity.adapters.ort_genai import build
    from parity.adapters.ort_genai.held import held_weights

    spec = resolve_spec("tiny-gemma2")
    a = get_adapter("ort-genai-int4")
    folder, _, _ = build.built(spec, random_weights(spec, 0), a.precision, a.options())
    import onnx.numpy_helper  # noqa: F401 -- imported before counting: a module's import is no held weight

    tracemalloc.start()
    try:
        held, _ = held_weights(spec, folder)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = sum(held.tensors[k].nbytes for k in held.tensors)  # every tensor dequantized, float32
    assert kept < whole / 8 and peak < whole, (kept, peak, whole)  # a dict of them kept 2.7x `whole` (main)
    assert isinstance(held.tensors, HeldTensors)
    first = held.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert first is not held.tensors["model.layers.0.self_attn.k_proj.weight"]  # made anew each time, not cached
