"""parity.gate.baseline and parity.gate.waivers as functions: reduce, gate (regression, new divergence, improvement,
update, missing), and waivers (parse, bad input, apply, expiry), on one module-scoped harness run."""

import copy
import dataclasses
import datetime as dt
import json
import math
import re
from pathlib import Path

import pytest

from parity.gate import baseline as bl
from parity.errors import ParityInputError
from parity.gate.waivers import (CAUSE_IDS, apply_waivers, explains_failure, load_waivers, parse_waivers, unwaived,
                            waived_causes)

PROMPTS = {"p": [2, 17, 301, 5, 88, 260, 9, 140]}
ROOT = Path(__file__).resolve().parents[1]


def _run(impls):
    from parity.harness import Request, run
    from parity.model.presets import PRESETS
    from tests.variants import swapped_geglu

    return run(Request(spec=PRESETS["tiny-gemma"], impls=impls, adapters={"swapped-geglu": swapped_geglu()},
                       mode="both", prompts=PROMPTS))


@pytest.fixture(scope="module")
def report():
    """The port (honest) and the swapped-GeGLU port (broken), float32 and bfloat16, both modes."""
    return _run(["litgpt-style", "swapped-geglu"])


@pytest.fixture
def fresh(report):
    """A copy whose diagnosis and tap results a test may mark (waivers) without touching the shared one."""
    r = copy.copy(report)
    r.diagnosis = copy.deepcopy(report.diagnosis)
    r.results = [copy.copy(x) for x in report.results]
    return r


def relabel(data, src, dst):
    """A baseline in which `dst` computed what `src` did: for a regression of `dst`."""
    out = copy.deepcopy(data)
    for key in list(out["runs"]):
        if key.startswith(src + "@"):
            out["runs"][key.replace(src, dst, 1)] = copy.deepcopy(out["runs"][key])
    out["causes"] = [c for c in out["causes"] if c["impl"] != dst] + \
        [{**c, "impl": dst} for c in out["causes"] if c["impl"] == src]
    return out


def scale(data, run_prefix, factor):
    out = copy.deepcopy(data)
    for key, run in out["runs"].items():
        if key.startswith(run_prefix):
            for taps in run["errors"].values():
                for t, v in taps.items():
                    taps[t] = bl.sig3(v * factor) if v != "inf" else v
    return out


# ------------------------------------------------------------------------------------------- reduce
def test_reduce_keeps_errors_to_3_significant_digits_and_the_failing_taps(report):
    data = bl.reduce(report)
    assert data["format"] == bl.FORMAT and data["config"]["spec"] == "tiny-gemma"
    run = data["runs"]["litgpt-style@float32 cumulative"]
    r = next(x for x in report.results if (x.impl, x.dtype, x.mode, x.tap) == ("litgpt-style", "float32",
                                                                                 "cumulative", "logits"))
    assert run["errors"]["p"]["logits"] == float(f"{r.max_abs / r.ref_rms:.3g}")
    assert all(len(re.sub(r"e.*|[-.]|^0+", "", repr(v)).lstrip("0")) <= 3
               for v in run["errors"]["p"].values())
    assert "failed" not in run  # an honest run stores no failing taps
    broken = data["runs"]["swapped-geglu@float32 cumulative"]
    assert broken["failed"]["p"][0] == "layers.0.mlp.act"
    assert {"impl": "swapped-geglu", "dtype": "float32", "cause": "geglu-swapped", "tap": "layers.0.mlp.act",
            "severity": "divergence"} in data["causes"]
    assert json.loads(bl.dumps(data)) == data  # plain JSON: no NaN, no Infinity


def test_sig3_and_error_units():
    assert bl.sig3(0.000123456) == 0.000123 and bl.sig3(98765.0) == 98800.0 and bl.sig3(0.0) == 0.0
    assert bl.sig3(math.inf) == math.inf


def test_same_report_passes_with_nothing_to_say(report):
    g = bl.compare(bl.reduce(report), bl.reduce(report))
    assert g.passed and not g.regressions and not g.new_divergences and not g.improvements, g.message()
    assert g.compared == len(report.results)
    assert "PASS" in g.message()


# --------------------------------------------------------------------------------------------- gate
def test_a_broken_implementation_regresses_and_diverges(report):
    data = bl.reduce(report)
    base = relabel(data, "litgpt-style", "swapped-geglu")  # the baseline: swapped-geglu used to be right
    g = bl.compare(base, data, path="fixtures/baseline.json")
    assert not g.passed
    first = g.regressions[0]
    assert (first.run, first.tap) == ("swapped-geglu@float32 cumulative", "layers.0.mlp.act")
    assert first.now > 100 * first.baseline
    msg = g.message()
    assert "swapped-geglu@float32 cumulative [p] layers.0.mlp.act: baseline " in msg
    assert "swapped-geglu@float32: cause geglu-swapped at layers.0.mlp.act" in msg
    assert "swapped-geglu@float32 cumulative [p]: layers.0.mlp.act beyond tolerance, and" in msg
    assert "max(2 x baseline, baseline + 0.05 x tolerance)" in msg


def test_growth_beyond_the_factor_fails_within_it_passes(report):
    data = bl.reduce(report)
    key, tap = "litgpt-style@bfloat16 cumulative", "logits"
    base = data["runs"][key]["errors"]["p"][tap]
    for f, ok in ((1.9, True), (2.5, False)):
        now = copy.deepcopy(data)
        now["runs"][key]["errors"]["p"][tap] = base * f
        g = bl.compare(data, now)
        assert g.passed is ok, (f, g.message())
        if not ok:
            assert [(c.run, c.tap) for c in g.regressions] == [(key, tap)]
            assert f"baseline {base:.3g}, now {base * f:.3g}" in g.message()


def test_the_floor_keeps_zero_error_taps_from_tripping_on_noise(report):
    data = bl.reduce(report)
    key = "litgpt-style@float32 isolated"
    base = copy.deepcopy(data)
    base["runs"][key]["errors"]["p"]["embed"] = 0.0
    tol = 5e-5  # float32 atol (x RMS), isolated: no depth growth
    for now_value, ok in ((0.04 * tol, True), (0.06 * tol, False)):
        now = copy.deepcopy(data)
        now["runs"][key]["errors"]["p"]["embed"] = now_value
        assert bl.compare(base, now).passed is ok, now_value


def test_improvement_passes_and_says_so(report):
    data = bl.reduce(report)
    worse = scale(data, "litgpt-style@bfloat16", 10.0)  # the baseline had 10x the error
    g = bl.compare(worse, data)
    assert g.passed, g.message()
    assert g.improvements and all("litgpt-style@bfloat16" in i for i in g.improvements)
    assert "improved (" in g.message() and "--parity-update-baseline records them" in g.message()
    fixed = bl.compare(data, relabel(data, "litgpt-style", "swapped-geglu"))  # the broken port got fixed
    assert fixed.passed, fixed.message()
    assert any("cause geglu-swapped (at layers.0.mlp.act in the baseline) is gone" in i for i in fixed.improvements)
    assert any("beyond tolerance in the baseline, within it now" in i for i in fixed.improvements)


def test_runs_not_in_the_baseline_fail_and_baseline_runs_not_run_are_listed(report):
    data = bl.reduce(report)
    base = copy.deepcopy(data)
    del base["runs"]["swapped-geglu@bfloat16 isolated"]
    base["runs"]["keras@float32 cumulative"] = base["runs"]["litgpt-style@float32 cumulative"]
    g = bl.compare(base, data)
    assert not g.passed
    assert [x.split(":")[0] for x in g.not_in_baseline] == ["swapped-geglu@bfloat16 isolated"]
    assert "keras@float32 cumulative" in g.message()


def test_another_configuration_is_named_not_compared(report):
    data = bl.reduce(report)
    other = copy.deepcopy(data)
    other["config"]["weights"] = "0000000000000000"
    g = bl.compare(other, data)
    assert not g.passed and not g.regressions
    assert "weights hash: baseline '0000000000000000'" in g.message()


def test_missing_baseline_writes_the_obtained_file_and_fails(report, tmp_path):
    p = tmp_path / "fixtures" / "baseline.json"
    g = bl.gate(report, p)
    assert not g.passed and g.status == "missing"
    assert not p.exists() and (tmp_path / "fixtures" / "baseline.obtained.json").is_file()
    assert "no baseline at" in g.message() and "baseline.obtained.json" in g.message()


def test_update_rewrites_and_fails_then_the_gate_passes(report, tmp_path):
    p = tmp_path / "baseline.json"
    p.write_text(bl.dumps(scale(bl.reduce(report), "", 100.0)))
    g = bl.gate(report, p, update=True)
    assert not g.passed and g.status == "updated" and "rewritten" in g.message()
    assert bl.load(p) == json.loads(bl.dumps(bl.reduce(report)))
    again = bl.gate(report, p)
    assert again.passed, again.message()
    assert not (tmp_path / "baseline.obtained.json").exists()


def test_a_failing_gate_writes_the_obtained_file(report, tmp_path):
    p = tmp_path / "baseline.json"
    p.write_text(bl.dumps(relabel(bl.reduce(report), "litgpt-style", "swapped-geglu")))
    g = bl.gate(report, p)
    assert not g.passed and (tmp_path / "baseline.obtained.json").is_file()
    assert "baseline.obtained.json" in g.message()


def test_bad_baseline_files_are_one_line(tmp_path):
    (tmp_path / "b.json").write_text("{not json")
    (tmp_path / "c.json").write_text('{"runs": {}}')
    for name, needle in (("b.json", "not valid JSON"), ("c.json", "not a parity-baseline/1 file"),
                         ("missing.json", "does not exist")):
        with pytest.raises(ParityInputError) as e:
            bl.load(tmp_path / name)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_stored_baseline_is_small_and_for_the_default_configuration():
    data = bl.load(ROOT / "fixtures" / "baseline.json")
    assert data["config"]["spec"] == "tiny-gemma" and set(data["config"]["prompts"]) == {"short", "long"}
    dtypes = {k.split("@")[1].split()[0] for k in data["runs"]}
    modes = {k.split()[1] for k in data["runs"]}
    assert dtypes == {"float32", "bfloat16"} and modes == {"cumulative", "isolated"}
    assert {"litgpt-style", "hf"} <= {k.split("@")[0] for k in data["runs"]}
    assert (ROOT / "fixtures" / "baseline.json").stat().st_size < 100_000
    for run in data["runs"].values():
        for taps in run["errors"].values():
            assert all(v == "inf" or v == bl.sig3(v) for v in taps.values())


# ------------------------------------------------------------------------------------------ waivers
WAIVER = """
[[waiver]]
impl = "swapped-geglu"
tap = "*"
dtype = "{dtype}"
cause = "geglu-swapped"
reason = "the MLP rewrite lands next week"
expires = {expires}
"""


def test_waived_divergence_passes_with_a_note(fresh):
    ws = parse_waivers(WAIVER.format(dtype="float32", expires="2099-01-01"), "w.toml")
    applied = apply_waivers(fresh, ws, today=dt.date(2030, 1, 1))
    d32 = next(d for d in fresh.diagnosis if (d.impl, d.dtype) == ("swapped-geglu", "float32"))
    assert d32.severity == "waived" and d32.waived == "the MLP rewrite lands next week (expires 2099-01-01)"
    assert not [d for d in fresh.divergent_causes if d.dtype == "float32"]
    assert [d.dtype for d in fresh.divergent_causes] == ["bfloat16"]  # the waiver names float32 only
    rs = fresh.run_results("swapped-geglu", "float32", "cumulative")
    assert any(not r.passed for r in rs) and all(r.passed for r in unwaived(rs))
    assert any(not r.passed for r in unwaived(fresh.run_results("swapped-geglu", "bfloat16", "cumulative")))
    assert waived_causes(fresh, "swapped-geglu", "float32") == {"geglu-swapped": d32.waived}
    assert any(line.startswith("waived: swapped-geglu@float32 geglu-swapped") for line in applied.lines())
    from parity.report.render import to_json

    assert to_json(fresh)["diagnosis"][0]["waived"].startswith("the MLP rewrite")
    # the gate does not count waived growth or failures
    base = relabel(bl.reduce(fresh), "litgpt-style", "swapped-geglu")
    g = bl.compare(base, bl.reduce(fresh))
    assert all(c.run.startswith("swapped-geglu@bfloat16") for c in g.regressions)
    assert not any("float32" in d for d in g.new_divergences) and g.waived


def test_expired_waiver_fails_naming_it_and_its_date(fresh):
    ws = parse_waivers(WAIVER.format(dtype="*", expires="2024-03-01"), "fixtures/waivers.toml")
    applied = apply_waivers(fresh, ws, today=dt.date(2024, 3, 2))
    assert len(fresh.divergent_causes) == 2
    ev = fresh.divergent_causes[0].evidence
    assert "waiver fixtures/waivers.toml waiver #1 (the MLP rewrite lands next week) expired on 2024-03-01" in ev
    assert any("EXPIRED" in line and "2024-03-01" in line for line in applied.lines())
    assert all(not getattr(r, "waived", None) for r in fresh.results)
    # the day it expires it still holds
    fresh2 = copy.copy(fresh)
    fresh2.diagnosis = [dataclasses.replace(d, severity="divergence") for d in fresh.diagnosis]
    apply_waivers(fresh2, ws, today=dt.date(2024, 3, 1))
    assert not fresh2.divergent_causes


def test_probe_check_failures_explained_by_waived_causes(fresh):
    apply_waivers(fresh, parse_waivers(WAIVER.format(dtype="*", expires="2099-01-01")), today=dt.date(2030, 1, 1))
    msg = ("the MLP is not gelu(gate) * up:\n"
           "swapped-geglu@float32 mlp.act: GELU is gelu applied to mlp.up -> geglu-swapped")
    assert "geglu-swapped" in explains_failure(fresh, "swapped-geglu", "float32", msg)
    assert explains_failure(fresh, "swapped-geglu", "float32", msg + "\n... -> gelu-exact") is None
    assert explains_failure(fresh, "swapped-geglu", "float32", "a message naming no cause") is None
    assert explains_failure(fresh, "litgpt-style", "float32", msg) is None


def test_unused_waivers_are_listed(fresh):
    ws = parse_waivers(WAIVER.format(dtype="float16", expires="2099-01-01"))
    applied = apply_waivers(fresh, ws, today=dt.date(2030, 1, 1))
    assert not applied.waived and [w.dtype for w in applied.unused] == ["float16"]
    assert "matched nothing" in applied.lines()[0]


@pytest.mark.parametrize("text,needle", [
    (WAIVER.format(dtype="float32", expires="2099-13-01"), "is not a date"),
    (WAIVER.format(dtype="float32", expires='"next week"'), "is not a date"),
    (WAIVER.format(dtype="float32", expires="2099-01-01").replace("geglu-swapped", "geglu-swaped"),
     "cause 'geglu-swaped' is not in the catalogue"),
    (WAIVER.format(dtype="fp32", expires="2099-01-01"), "dtype 'fp32' is not a dtype"),
    (WAIVER.format(dtype="float32", expires="2099-01-01").replace("reason", "why"), "missing reason"),
    (WAIVER.format(dtype="float32", expires="2099-01-01") + "owner = 'me'\n", "unknown key(s) owner"),
    ("[[waiver]\nimpl = 1", "not valid TOML"),
    ("[waivers]\n", "unknown top-level key(s) ['waivers']"),
    (WAIVER.format(dtype="float32", expires="2099-01-01").replace('"swapped-geglu"', '""'), "non-empty string"),
])
def test_bad_waiver_files_are_one_line(text, needle):
    with pytest.raises(ParityInputError) as e:
        parse_waivers(text, "w.toml")
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("w.toml")


def test_quoted_dates_and_missing_files(tmp_path):
    ws = parse_waivers(WAIVER.format(dtype="*", expires='"2026-06-30"'))
    assert ws[0].expires == dt.date(2026, 6, 30) and ws[0].expired(dt.date(2026, 7, 1))
    with pytest.raises(ParityInputError, match="does not exist"):
        load_waivers(tmp_path / "nope.toml")


def test_the_example_waiver_file_parses_and_waives_nothing_by_default():
    path = ROOT / "fixtures" / "waivers.toml"
    assert load_waivers(path) == []
    example = "\n".join(line[2:] for line in path.read_text().splitlines() if line.startswith("# ")
                        and re.match(r"# (\[\[waiver\]\]|\w+ = )", line))
    (w,) = parse_waivers(example, "example")
    assert (w.impl, w.cause, w.expires) == ("hf", "gelu-exact", dt.date(2026, 6, 30))


def test_cause_ids_are_the_catalogue():
    from parity.diagnose.causes import CAUSE_IDS as catalogue

    assert CAUSE_IDS is catalogue  # waivers check ids against the one table (tests/test_causes.py tests the table)
