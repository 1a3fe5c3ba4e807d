"""Decode-path parity through the harness: correct caches pass past the window, decode faults are named.

Every implementation decodes through its own KV cache (the port's ring
buffer, transformers' dynamic and static caches, keras-hub's cache) and is
compared at every step with the float64 port's full forward and with its own
full forward. The faults are patched into transformers' own cache and mask
code, or built into the port (tests/faults.py: DECODE_FAULTS).
"""

import json

import pytest

from parity.harness import Request, run
from parity.model.presets import PRESETS
from parity.report.cli import main
from tests.faults import DECODE_FAULTS, detect_decode

SPECS = ("tiny-gemma", "tiny-gemma2", "tiny-gemma3")


@pytest.mark.parametrize("fault,dtype", [(f, d) for f in DECODE_FAULTS for d in ("float32", "bfloat16")],
                         ids=[f"{f.cause}-{f.name.replace(' ', '_')}-{d}" for f in DECODE_FAULTS
                              for d in ("float32", "bfloat16")])
def test_decode_fault_is_detected_located_named(fault, dtype):
    r = detect_decode(fault, dtype)
    assert r["detected"], f"{fault.name} {dtype}: the report passed ({r['headline']})"
    assert r["prefill_passed"], f"{fault.name} {dtype}: a decode-only fault failed the prefill: {r['headline']}"
    assert r["located"], (f"{fault.name} {dtype}: first divergence at step {r['first_step']} {r['first_tap']}, "
                          f"expected step {fault.step_in(dtype)} {fault.first_tap}")
    assert r["named"], f"{fault.name} {dtype}: named {r['named_as']}, expected {fault.cause}; {r['evidence']}"


@pytest.mark.parametrize("spec", SPECS)
def test_correct_caches_agree_past_twice_the_window(spec):
    s = PRESETS[spec]
    report = run(Request(spec=s, impls=["litgpt-style", "hf", "hf-static"], decode="auto"))
    v = report.verdict
    assert v.status == "PASS", v.headline
    window = s.sliding_window or 0
    assert len(report.continuation) >= 2 * window  # past the prompt by twice the window: every ring wraps
    decode_runs = [r for r in v.runs if r.mode in ("decode", "decode-self")]
    assert {(r.impl, r.mode) for r in decode_runs} >= {(i, m) for i in ("litgpt-style", "hf", "hf-static")
                                                       for m in ("decode", "decode-self")}
    for r in decode_runs:
        assert r.basis == "honest", r
    # the caches are compared, entry by entry, at every step of every layer
    cache = [t for t in report.results if t.mode == "decode" and t.tap.endswith("cache.k")]
    assert {t.impl for t in cache} == {"litgpt-style", "hf", "hf-static"}
    assert all(len(t.steps) == len(report.continuation) for t in cache)


def test_keras_hub_decodes_within_noise():
    report = run(Request(spec=PRESETS["tiny-gemma3"], impls=["keras"], decode="auto"))
    assert report.verdict.status == "PASS", report.verdict.headline
    assert any(r.mode == "decode" and r.impl == "keras" for r in report.verdict.runs)


def test_report_json_carries_the_step_and_per_step_errors(tmp_path):
    out = tmp_path / "out"
    code = main(["--impls", "tests.faults:_port_stale", "--spec", "tiny-gemma2", "--dtypes", "float32",
                 "--tokens", ",".join(map(str, range(3, 11))), "--decode", "20", "--quiet", "--out", str(out)])
    assert code == 1
    data = json.loads((out / "report.json").read_text())
    assert data["first_divergence"]["step"] == 8 and data["first_divergence"]["tap"] == "layers.0.cache.k"
    assert data["first_divergence"]["mode"] == "decode"
    assert all(t["step"] is None for t in data["taps"] if t["mode"] == "cumulative")
    assert {t["mode"] for t in data["taps"]} == {"cumulative", "decode", "decode-self"}
    per = {(r["impl"], r["mode"]): r["used"] for r in data["decode"]["per_step"]}
    assert len(per[("port-stale", "decode")]) == 20 and max(per[("port-stale", "decode")][:8]) <= 1
    assert per[("port-stale", "decode")][8] > 1
    assert data["decode"]["continuation"] and len(data["decode"]["continuation"]) == 20
    assert "cache-stale" in data["headline"] and "decode step 8" in data["headline"]
    assert "Decode: each step's worst tap" in (out / "report.md").read_text()
    assert "Error per decode step" in (out / "report.html").read_text()


def test_decode_in_separate_processes_gives_the_same_verdict(tmp_path):
    req = dict(spec=PRESETS["tiny-gemma2"], impls=["litgpt-style", "hf"], dtypes=["bfloat16"], decode=18,
               noise_members=2)
    here = run(Request(**req))
    apart = run(Request(**req, separate_processes=True))
    assert here.verdict.status == apart.verdict.status == "PASS"
    key = lambda r: (r.impl, r.mode, r.prompt, r.tap)  # noqa: E731
    a = {key(r): r.stat for r in here.results}
    b = {key(r): r.stat for r in apart.results}
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-12 + 1e-9 * abs(a[k]) for k in a)


def test_an_implementation_that_cannot_decode_is_said_to_be_skipped():
    from tests.contract_adapters import no_decode

    adapter = no_decode()
    report = run(Request(spec=PRESETS["tiny-gemma"], impls=["litgpt-style", adapter.name], dtypes=["float32"],
                         adapters={adapter.name: adapter}, decode=3))
    assert f"{adapter.name} (decode)" in report.skipped
    assert not [r for r in report.verdict.runs if r.impl == adapter.name and r.mode != "cumulative"]
    assert report.verdict.status == "PASS"


@pytest.mark.parametrize("args,needle", [
    (["--decode", "-1"], "--decode '-1' is not a step count"),
    (["--decode", "many"], "--decode 'many' is not a step count"),
    (["--decode", "600"], "beyond the spec's max_position 512"),
    (["--decode-tokens", "3,99999"], "99999"),
])
def test_bad_decode_input_is_one_line_before_any_work(tmp_path, capsys, args, needle):
    out = tmp_path / "never"
    code = main(["--impls", "litgpt-style", "--dtypes", "float32", "--quiet", "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert needle in err[0], err[0]
    assert not out.exists()


def test_a_decode_that_returns_too_few_steps_is_an_implementation_failure(tmp_path, capsys):
    code = main(["--impls", "tests.contract_adapters:decodes_too_few", "--dtypes", "float32", "--decode", "4",
                 "--quiet", "--out", str(tmp_path / "o"), "--tokens", "2,17,301,5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "returned 3 steps for 4 continuation tokens" in err[0], err
