"""One pairing of traces: a run's saved traces, prefill and decode, passed back with --trace give its report.

`harness.run` and `harness.from_traces` both pair through parity.compare.pairs.pair_traces: a decode trace is
compared with the reference's full forward (mode decode) and with its own full forward (mode decode-self).
"""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from parity.capture.decode import DECODE
from parity.capture.trace import load_trace
from parity.errors import ParityInputError
from parity.harness import Request, from_traces, run
from parity.model.weights import random_weights, save_weights
from parity.report.cli import main
from parity.report.render import to_json

RUN = ["--impls", "litgpt-style,hf", "--dtypes", "float32", "--decode", "2", "--noise-members", "0", "--quiet"]


def _normal(report: dict) -> dict:
    """report.json with its lists in one order: --trace reads the files in the order given (a shell glob's)."""
    key = lambda x: json.dumps(x, sort_keys=True)  # noqa: E731
    out = dict(report)
    for k in ("verdicts", "runs", "taps", "probes", "diagnosis", "first_divergences"):
        out[k] = sorted(out[k], key=key)
    if out["decode"]:
        out["decode"] = {**out["decode"], "per_step": sorted(out["decode"]["per_step"], key=key)}
    return out


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The tiny default spec decoded 2 steps by the port and transformers, its traces saved; and its weights file
    (so the probes read the same weights from the files as in the run)."""
    d = tmp_path_factory.mktemp("saved")
    weights = save_weights(random_weights(tiny, seed=0), d / "weights.safetensors")
    assert main([*RUN, "--weights", str(weights), "--save-traces", "--out", str(d / "run")]) == 0
    return d / "run", weights


def test_saved_decode_traces_give_the_runs_report_back(saved, tmp_path):
    out, weights = saved
    files = sorted((out / "traces").glob("*.safetensors"))
    assert main([*(a for f in files for a in ("--trace", str(f))), "--weights", str(weights), "--quiet",
                 "--out", str(tmp_path / "back")]) == 0
    ran = json.loads((out / "report.json").read_text())
    back = json.loads((tmp_path / "back" / "report.json").read_text())
    # not vacuous: both implementations' decode and decode-self runs, every step, are in the run's report
    assert {(s["impl"], s["mode"]) for s in ran["decode"]["per_step"]} == \
        {(i, m) for i in ("litgpt-style", "hf") for m in ("decode", "decode-self")}
    assert len(ran["decode"]["continuation"]) == 2 and ran["probes"]
    assert _normal(back) == _normal(ran)


def test_a_decode_trace_of_other_tokens_is_still_refused(saved, tmp_path, capsys):
    out, _ = saved
    files = sorted((out / "traces").glob("*.safetensors"))
    mine = out / "traces" / "hf@float32.decode.short.safetensors"
    t = load_trace(mine)
    other = dataclasses.replace(t, tokens=t.tokens[:-1] + [t.tokens[-1] + 1])  # the last decoded token changed
    edited = other.save(tmp_path / mine.name)
    args = [a for f in files for a in ("--trace", str(edited if f == mine else f))]
    assert main([*args, "--quiet", "--out", str(tmp_path / "c")]) == 2
    assert "hf@float32 prompt 'short' ran different tokens than the reference" in capsys.readouterr().err


def test_a_decode_trace_without_the_references_full_forward_is_refused(saved, tmp_path, capsys):
    out, _ = saved
    files = [f for f in sorted((out / "traces").glob("*.safetensors"))
             if not f.name.startswith("litgpt-style@float64.decode-full")]
    assert main([*(a for f in files for a in ("--trace", str(f))), "--quiet", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "has no reference full forward" in err and "litgpt-style@float64's decode-full trace" in err


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.tokens[:t.prefill] + [x + 1 for x in t.tokens[t.prefill:]], "decode different continuations"),
    (lambda t: [t.tokens[0] + 1] + t.tokens[1:], "starts with other tokens than its cumulative trace"),
])
def test_reference_full_forwards_of_another_run_are_refused(saved, edit, needle):
    """The continuation is read from the reference's full forwards: one of another run's is bad input."""
    out, _ = saved
    traces = [load_trace(f, lazy=True) for f in sorted((out / "traces").glob("*.safetensors"))]
    traces = [dataclasses.replace(t, tokens=edit(t)) if (t.impl, t.dtype, t.mode, t.prompt) ==
              ("litgpt-style", "float64", "decode-full", "short") else t for t in traces]
    with pytest.raises(ParityInputError, match=needle):
        from_traces(traces)


# ------------------------------------------------------------------ a decode fault, from files
HIDDEN = re.compile(r"rope\.cos|layers\.\d+\.(attn\.(scores|probs)|cache\.[kv])")  # what the decode probes read


@pytest.fixture(scope="module")
def pos_fault():
    """The port rotating each decoded token at p+1 (cache-position), on the Gemma 2 tiny preset."""
    from parity.adapters.litgpt_style import LitgptStyleAdapter
    from parity.adapters.port_model import PortOptions
    from parity.model.presets import PRESETS

    a = LitgptStyleAdapter(PortOptions(decode_pos_offset=1), name="port-pos-plus")
    return run(Request(spec=PRESETS["tiny-gemma2"], impls=[a.name], dtypes=["float32"], adapters={a.name: a},
                       prompts={"short": [2, 5, 9, 13, 17, 21, 25, 29]}, decode=4, noise_members=0))


def _saved(report, d: Path):
    return [load_trace(t.save(d / f"{t.impl}@{t.dtype}.{t.mode}.{t.prompt}.safetensors"), lazy=True)
            for t in report.traces]


def test_a_decode_fault_read_back_from_files_gives_the_same_verdict_and_cause(pos_fault, tmp_path):
    back = from_traces(_saved(pos_fault, tmp_path), weights=pos_fault.weights)
    ran, got = to_json(pos_fault), to_json(back)
    assert not ran["passed"] and ran["first_divergence"]["step"] == 0
    assert {d["cause"] for d in ran["diagnosis"] if d.get("mode") == DECODE} == {"cache-position"}
    assert _normal(got) == _normal(ran)


def test_a_decode_counterfactual_that_raises_is_reported(pos_fault, monkeypatch):
    """With the probes' taps gone the decode counterfactuals name it; one that cannot run is reported with its
    error beside the cause, and the ranking is otherwise the same."""
    from parity.diagnose import counterfactuals
    from parity.diagnose.counterfactuals import Counterfactual

    blind = [dataclasses.replace(t, taps={k: v for k, v in t.taps.items() if not HIDDEN.fullmatch(k)})
             if t.mode == DECODE else t for t in pos_fault.traces]

    def decoded(report):
        (entry,) = [d for d in report.diagnosis if d.mode == DECODE]
        return entry.to_json()  # the report.json view: what a reader of the file sees

    clean = decoded(from_traces(blind, weights=pos_fault.weights))
    assert clean["cause"] == "cache-position" and clean["source"] == "counterfactual" and "failed" not in clean
    real = counterfactuals.decode_candidates
    broken = Counterfactual("cache-position", "a variant that cannot be built", options=(("no_such_option", 1),))
    monkeypatch.setattr(counterfactuals, "decode_candidates", lambda spec: [broken, *real(spec)])
    entry = decoded(from_traces(blind, weights=pos_fault.weights))
    assert entry["cause"] == "cache-position" and entry["source"] == "counterfactual"
    (failed,) = entry["failed"]
    assert failed["candidate"] == "a variant that cannot be built" and failed["error"].startswith("TypeError")
    assert "1 candidate(s) could not be run (first: 'a variant that cannot be built': TypeError" in entry["evidence"]
    assert entry["evidence"].startswith(clean["evidence"])  # the same ranking, the failure added
