"""The pytest plugin, run the way users run it: options, fixtures, the baseline gate and waivers through
pytest itself (pytester, in process), bad input as usage errors, and JUnit XML from a real subprocess.

The inner sessions run "my-port", a lit-gpt-style port registered as `ports:good` or, broken (GELU on the
up projection), as `ports:bad`: the same name, so a baseline recorded with one gates the other.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

@pytest.fixture(scope="module", autouse=True)
def warm(tmp_path_factory):
    """The inner sessions run in this process, and pytester drops the modules each one imported when it ends;
    extension modules (numpy's, torch's) cannot load twice. Run the port's whole path here once, first."""
    import ml_dtypes  # noqa: F401
    import safetensors.numpy  # noqa: F401

    from parity.harness import Request, run
    from parity.model.presets import PRESETS
    from parity.report.files import write_report

    report = run(Request(spec=PRESETS["tiny-gemma"], impls=["litgpt-style"], dtypes=["float32"], mode="both",
                         prompts={"p": [2, 5, 7]}))
    write_report(report, tmp_path_factory.mktemp("warm"))


pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]

PORTS = """
from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.adapters.port_model import PortOptions


def good():
    return LitgptStyleAdapter(name="my-port")


def bad():
    return LitgptStyleAdapter(PortOptions(geglu_swapped=True), name="my-port")
"""

# the parity suite's own checks, collected into the inner session
SUITE = """
from parity.test_baseline_gate import test_baseline_gate
from parity.test_geglu import test_geglu_gate_times_up_half_width
from parity.test_layers import (test_layers_cumulative_within_tolerance, test_layers_isolated_within_tolerance,
                                test_no_named_divergence)
"""

WAIVER = """
[[waiver]]
impl = "my-port"
tap = "*"
dtype = "float32"
cause = "geglu-swapped"
reason = "MLP rewrite in review"
expires = {expires}
"""


@pytest.fixture
def inner(pytester):
    pytester.makepyfile(ports=PORTS, test_suite=SUITE)
    pytester.syspathinsert()

    def run(*args, port="good"):
        return pytester.runpytest("-p", "no:cacheprovider", "--parity-impls", f"ports:{port}",
                                  "--parity-dtypes", "float32", "--parity-baseline", "b.json", "-rxs", *args)

    return run


def text(result) -> str:
    return "\n".join(result.outlines + result.errlines)


def test_options_are_under_one_prefix(pytester):
    out = text(pytester.runpytest("--help"))
    for opt in ("--parity-impls", "--parity-dtypes", "--parity-spec", "--parity-checkpoint", "--parity-report-dir",
                "--parity-baseline", "--parity-update-baseline", "--parity-waivers"):
        assert opt in out, opt


def test_baseline_missing_then_updated_then_gating(inner, pytester):
    r = inner()  # no baseline: the obtained file is written beside it, the gate fails
    r.assert_outcomes(passed=4, failed=1)
    assert "no baseline at b.json; wrote b.obtained.json" in text(r)
    assert (pytester.path / "b.obtained.json").is_file() and not (pytester.path / "b.json").exists()

    r = inner("--parity-update-baseline")  # rewrites, and still fails that run
    r.assert_outcomes(passed=4, failed=1)
    assert "baseline b.json rewritten from this session" in text(r)
    data = json.loads((pytester.path / "b.json").read_text())
    assert set(data["runs"]) == {"my-port@float32 cumulative", "my-port@float32 isolated"}

    r = inner()  # the same implementation: passes, and the summary says so
    r.assert_outcomes(passed=5)
    out = text(r)
    assert "baseline b.json: PASS" in out
    assert "run" in out and "taps ok" in out and "first divergence" in out  # the terminal summary table
    assert any(line.startswith("my-port@float32") and "cumulative" in line and line.rstrip().endswith("PASS")
               for line in r.outlines)

    r = inner(port="bad")  # a regression of my-port: the gate names it
    r.assert_outcomes(failed=5)
    out = text(r)
    assert "regressions (error = max|actual - ref| / rms(ref); a regression is now > max(2 x baseline" in out
    assert "my-port@float32 cumulative [short] layers.0.mlp.act: baseline " in out
    assert "new divergences" in out and "my-port@float32: cause geglu-swapped at layers.0.mlp.act" in out
    assert (pytester.path / "b.obtained.json").is_file()


def test_improvement_passes_and_says_so(inner, pytester):
    inner("--parity-update-baseline")
    data = json.loads((pytester.path / "b.json").read_text())
    for run in data["runs"].values():
        for taps in run["errors"].values():
            for t in taps:
                taps[t] = 10 * taps[t] + 1e-3
    (pytester.path / "b.json").write_text(json.dumps(data))
    r = inner("-s")
    r.assert_outcomes(passed=5)
    out = text(r)
    assert "baseline b.json: PASS" in out and "improved (" in out
    assert "my-port@float32 cumulative [short] embed: baseline " in out and "more" in out


def test_waived_divergence_passes_with_a_note_and_the_report_says_so(inner, pytester):
    inner("--parity-update-baseline")
    pytester.makefile(".toml", waivers=WAIVER.format(expires="2099-01-01"))
    r = inner("--parity-waivers", "waivers.toml", "--parity-report-dir", "out", port="bad")
    r.assert_outcomes(passed=4, xfailed=1)  # the GeGLU probe check: xfail, with the waiver's reason
    out = text(r)
    assert "waived: my-port@float32 geglu-swapped at layers.0.mlp.act: MLP rewrite in review (expires 2099-01-01)" \
        in out
    assert "XFAIL" in out and "waived: geglu-swapped: MLP rewrite in review (expires 2099-01-01)" in out
    assert "WAIVED" in out
    report = json.loads((pytester.path / "out" / "report.json").read_text())
    (d,) = [d for d in report["diagnosis"] if d["impl"] == "my-port"]
    assert d["severity"] == "waived" and d["waived"] == "MLP rewrite in review (expires 2099-01-01)"
    assert (pytester.path / "out" / "report.md").is_file()
    assert "parity report: " in out and "report.json" in out


def test_expired_waiver_fails_naming_it_and_its_date(inner, pytester):
    pytester.makefile(".toml", waivers=WAIVER.format(expires="2021-05-04"))
    r = inner("--parity-waivers", "waivers.toml", "-k", "named_divergence", port="bad")
    r.assert_outcomes(failed=1)
    out = text(r)
    assert "waiver waivers.toml waiver #1 (MLP rewrite in review) expired on 2021-05-04" in out
    assert "EXPIRED waiver" in out


@pytest.mark.parametrize("args,needle", [
    (["--parity-waivers", "bad.toml"], "bad.toml waiver #1: cause 'gelu-exactly' is not in the catalogue"),
    (["--parity-waivers", "date.toml"], "date.toml line 7: expires = '2026-02-30' is not a date"),
    (["--parity-waivers", "missing.toml"], "waiver file"),
    (["--parity-dtypes", "fp32"], "unknown dtype 'fp32'"),
    (["--parity-checkpoint", "nowhere"], "--parity-checkpoint 'nowhere' does not exist"),
    (["--parity-spec", "tiny-gemma", "--parity-checkpoint", "."], "--parity-checkpoint gives the spec"),
    (["--parity-spec", "gemma-99b"], "unknown spec 'gemma-99b'"),
    (["--parity-impls", "nope"], "unknown implementation 'nope'"),
])
def test_bad_input_is_a_one_line_usage_error(pytester, args, needle):
    pytester.makepyfile(test_x="def test_x(impl_dtype):\n    pass\n")
    pytester.makefile(".toml", bad=WAIVER.format(expires="2030-01-01").replace("geglu-swapped", "gelu-exactly"),
                      date=WAIVER.format(expires="2026-02-30"))
    r = pytester.runpytest("-p", "no:cacheprovider", *args)
    assert r.ret == pytest.ExitCode.USAGE_ERROR, text(r)
    errors = [line for line in r.errlines if line.startswith("ERROR: parity: ")]
    assert len(errors) == 1 and needle in errors[0], r.errlines


def test_user_fixtures_from_a_checkpoint(pytester):
    """--parity-checkpoint gives parity_spec and parity_weights; parity_trace runs one implementation."""
    from safetensors.numpy import save_file

    from parity.model.presets import PRESETS
    from parity.model.spec import save_config_json
    from parity.model.weights import random_weights

    spec = PRESETS["tiny-gemma"].replace(num_layers=2)
    ckpt = pytester.path / "ckpt"
    save_config_json(spec, ckpt)
    save_file(random_weights(spec, seed=3).tensors, str(ckpt / "model.safetensors"))
    pytester.makepyfile(test_mine="""
        from parity.gate.checks import check_gelu_tanh, check_norm_unit_offset


        def test_my_port(parity_spec, parity_weights, parity_trace, parity_waivers):
            assert parity_spec.num_layers == 2 and "(hf)" in parity_weights.source and parity_waivers == []
            t = parity_trace("litgpt-style", "bfloat16")
            assert t.label == "litgpt-style@bfloat16" and len(t.tokens) == 48 and "logits" in t.taps
            assert parity_trace("litgpt-style", "bfloat16") is t  # captured once
            assert len(parity_trace("litgpt-style", "float32", "short").tokens) == 8
            assert parity_trace("litgpt-style", "float32", [2, 5, 7]).tokens == [2, 5, 7]
            check_gelu_tanh(t, parity_spec)
            check_norm_unit_offset(t, parity_spec, parity_weights.tensors)
    """)
    r = pytester.runpytest("-p", "no:cacheprovider", "--parity-checkpoint", "ckpt")
    r.assert_outcomes(passed=1)
    assert not [line for line in r.outlines if line.startswith("=") and " parity " in line]  # no report: no summary


def test_junit_xml_carries_each_check_and_its_failure_message(tmp_path):
    """`pytest parity -k logits --junitxml`, as CI runs it, with a broken port beside the port and HF."""
    xml = tmp_path / "out.xml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "parity", "-k", "logits", "-p", "no:cacheprovider", "-q",
         "--parity-impls", "litgpt-style,hf,tests.variants:swapped_geglu", f"--junitxml={xml}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = {c.get("name"): c for c in ET.parse(xml).getroot().iter("testcase")}
    for impl in ("litgpt-style", "hf", "swapped-geglu"):
        for dtype in ("float32", "bfloat16"):
            for check in ("test_logits_within_tolerance", "test_logits_distribution"):
                assert f"{check}[{impl}-{dtype}]" in cases, sorted(cases)
    for name, case in cases.items():
        failure = case.find("failure")
        if name.split("[")[1].startswith("swapped-geglu"):
            assert failure is not None, name
        else:
            assert failure is None, (name, failure.get("message") if failure is not None else "")
    tol = cases["test_logits_within_tolerance[swapped-geglu-float32]"].find("failure").get("message")
    assert "cumulative logits beyond tolerance" in tol
    assert "swapped-geglu@float32 cumulative logits [short]:" in tol and "elements" in tol and "allowed" in tol
    kl = cases["test_logits_distribution[swapped-geglu-bfloat16]"].find("failure").get("message")
    assert "swapped-geglu@bfloat16 [short]: mean KL" in kl
    assert cases["test_logits_distribution[hf-float32]"].get("classname") == "parity.test_logits"
    summary = proc.stdout[proc.stdout.index("= parity ="):]  # the terminal summary: one row per run
    assert any(line.startswith("swapped-geglu@float32") and "layers.0.mlp.act" in line and "geglu-swapped" in line
               and line.rstrip().endswith("FAIL") for line in summary.splitlines()), summary
