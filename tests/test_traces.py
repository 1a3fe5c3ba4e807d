"""Traces: saved and loaded exactly, captured in another process, compared from files with --trace."""

import json

import numpy as np
import pytest

from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.capture.runner import capture, capture_in_subprocess
from parity.errors import ParityInputError
from parity.report.cli import main
from parity.capture.trace import load_trace


def test_save_load_round_trip_keeps_bf16_values_and_metadata(tiny, tiny_weights, tokens, tmp_path):
    t = capture(LitgptStyleAdapter(), tiny, tiny_weights, "bfloat16", {"p": tokens})[0]
    back = load_trace(t.save(tmp_path / "t.safetensors"))
    assert back.meta() == t.meta()
    for k in t.taps:
        assert np.array_equal(back.taps[k], t.taps[k]), k


def test_capture_in_another_process_matches_in_process(tiny, tiny_weights, tokens):
    here = capture(LitgptStyleAdapter(), tiny, tiny_weights, "float32", {"p": tokens})[0]
    there = capture_in_subprocess("litgpt-style", tiny, tiny_weights, "float32", {"p": tokens})[0]
    assert list(there.taps) == list(here.taps)
    assert all(np.array_equal(there.taps[k], here.taps[k]) for k in here.taps)


def test_reports_from_trace_files_of_two_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tokens = ["--tokens", "2,17,301,5,88,260"]
    assert main(["--impls", "hf", "--dtypes", "float32", "--quiet", "--save-traces", "--out", str(a)] + tokens) == 0
    assert main(["--impls", "tests.variants:swapped_geglu", "--dtypes", "bfloat16", "--quiet", "--save-traces",
                 "--out", str(b)] + tokens) == 1
    traces = [a / "traces" / "litgpt-style@float64.cumulative.tokens0.safetensors",
              a / "traces" / "hf@float32.cumulative.tokens0.safetensors",
              b / "traces" / "swapped-geglu@bfloat16.cumulative.tokens0.safetensors"]
    out = tmp_path / "c"
    assert main(sum((["--trace", str(p)] for p in traces), []) + ["--quiet", "--out", str(out)]) == 1
    data = json.loads((out / "report.json").read_text())
    assert data["first_divergence"]["impl"] == "swapped-geglu"
    assert {d["cause"] for d in data["diagnosis"]} == {"geglu-swapped"}
    assert [r for r in data["runs"] if r["impl"] == "hf"]


def test_traces_of_different_weights_do_not_compare(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    main(["--impls", "hf", "--dtypes", "float32", "--quiet", "--save-traces", "--out", str(a), "--tokens", "2,5"])
    main(["--impls", "hf", "--dtypes", "float32", "--quiet", "--save-traces", "--out", str(b), "--tokens", "2,5",
          "--seed", "1"])
    code = main(["--trace", str(a / "traces" / "litgpt-style@float64.cumulative.tokens0.safetensors"),
                 "--trace", str(b / "traces" / "hf@float32.cumulative.tokens0.safetensors"), "--quiet",
                 "--out", str(tmp_path / "c")])
    assert code == 2 and "same weights" in capsys.readouterr().err


def test_not_a_trace_is_bad_input(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ParityInputError, match="not a parity trace"):
        load_trace(tmp_path / "x.safetensors")
