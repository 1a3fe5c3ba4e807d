"""The metric registry: SQNR and the error percentiles measured right on known arrays, and a metric registered
here (and unregistered after) found, with its formatted value, in every output of real harness runs: report.json,
the terminal, report.md, report.html and the pytest summary. No renderer names a metric."""

import json
import math
import re

import numpy as np
import pytest

from parity.numerics.metric_registry import METRICS, Metric, compute, register, unregister
from parity.numerics.metrics import error_percentile, sqnr_db

pytest_plugins = ["pytester"]


# ------------------------------------------------------------------------------------- the numbers
def test_sqnr_and_percentiles_on_one_row():
    ref = np.array([[1.0, 2.0, 2.0, 4.0]])  # row RMS sqrt(25 / 4) = 2.5
    act = ref + np.array([[0.0, 0.5, -0.5, 1.0]])  # |a - r| / 2.5 = [0, 0.2, 0.2, 0.4]
    assert sqnr_db(act, ref) == pytest.approx(10 * math.log10(25 / 1.5), rel=1e-12)
    assert error_percentile(act, ref, 50) == pytest.approx(0.2, rel=1e-12)  # between the two middle 0.2s
    assert error_percentile(act, ref, 99) == pytest.approx(0.2 + 0.97 * 0.2, rel=1e-12)  # position 2.97 of 0..3


def test_percentiles_scale_each_row_by_its_own_rms():
    ref = np.array([[1.0] * 4, [10.0] * 4])  # row RMS 1 and 10
    act = ref + 0.1  # scaled errors: 0.1 in row 0, 0.01 in row 1
    assert error_percentile(act, ref, 50) == pytest.approx(0.055, rel=1e-12)  # position 3.5 of 8 sorted
    assert error_percentile(act, ref, 99) == pytest.approx(0.1, rel=1e-12)
    assert error_percentile(act, ref, 25) == pytest.approx(0.01, rel=1e-12)
    scaled = np.concatenate([[0.1] * 4, [0.01] * 4])
    for q in (1, 37, 50, 90, 99):
        assert error_percentile(act, ref, q) == pytest.approx(np.percentile(scaled, q), rel=1e-12)
    # a whole-tap RMS instead would scale row 0's error by ~7.1, not 1: the median would be ~0.0078
    assert error_percentile(act, ref, 50) != pytest.approx(np.median(np.abs(act - ref)) / np.sqrt(np.mean(ref**2)))


def test_equal_nonfinite_and_masked_values():
    ref = np.array([[1.0, -2.0, 3.0, -np.inf]])  # a masked score: -inf on both sides agrees
    assert sqnr_db(ref, ref) == math.inf
    assert error_percentile(ref, ref, 50) == 0.0 and error_percentile(ref, ref, 99) == 0.0
    act = ref + np.array([[0.1, 0.0, 0.0, 0.0]])
    assert sqnr_db(act, ref) == pytest.approx(10 * math.log10(14 / 0.01), rel=1e-9)  # -inf is no signal
    nan = ref.copy()
    nan[0, 2] = np.nan
    assert sqnr_db(nan, ref) == -math.inf
    assert error_percentile(nan, ref, 99) == math.inf  # interpolates towards the NaN's infinite error
    assert error_percentile(nan, ref, 50) == 0.0  # the median of [0, 0, 0, inf] is still 0
    assert sqnr_db(np.ones(3), np.zeros(3)) == -math.inf  # noise and no signal


def test_higher_sqnr_means_closer():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 64))
    near, far = ref + 1e-6 * rng.normal(size=ref.shape), ref + 1e-2 * rng.normal(size=ref.shape)
    assert sqnr_db(near, ref) == pytest.approx(120, abs=1) and sqnr_db(far, ref) == pytest.approx(40, abs=1)
    assert METRICS["sqnr"].worst([sqnr_db(near, ref), sqnr_db(far, ref)]) == sqnr_db(far, ref)  # lower is worse
    assert METRICS["err_p99"].worst([0.1, 0.3, float("nan")]) == 0.3  # higher is worse; NaN is no value


def test_a_declaration_is_checked_when_registered():
    with pytest.raises(ValueError, match="already registered"):
        register(Metric("sqnr", sqnr_db))
    with pytest.raises(ValueError, match="worse='up'"):
        Metric("x", sqnr_db, worse="up")
    with pytest.raises(ValueError, match="not an identifier"):
        Metric("err p99", sqnr_db)
    with pytest.raises(ValueError):
        Metric("x", sqnr_db, fmt="%.3f")  # not a format spec


# ------------------------------------------------------------------------ a toy metric in every output
def toy(actual, reference) -> float:
    """The elements compared plus a quarter: a value no other number in the outputs has."""
    return float(reference.size) + 0.25


TOY = Metric("toy_count", toy, fmt=".2f", worse="higher", description="elements compared, plus 0.25")


@pytest.fixture(scope="module")
def registered():
    register(TOY)
    yield TOY
    unregister(TOY.name)


@pytest.fixture(scope="module")
def report(registered):
    """A real harness run: the port in float32 against the float64 reference, both modes (also warms the
    modules pytester's inner session below would otherwise import twice)."""
    from parity.harness import Request, run
    from parity.model.presets import PRESETS

    return run(Request(spec=PRESETS["tiny-gemma"], impls=["litgpt-style"], dtypes=["float32"], mode="both",
                       prompts={"p": [2, 5, 7, 11]}, noise_members=0))


def expected(taps: list[dict]) -> dict[str, str]:
    """mode -> the toy's worst value over that run's taps, formatted as declared, from report.json's taps."""
    out = {}
    for t in taps:
        out[t["mode"]] = max(out.get(t["mode"], 0.0), t["metrics"]["toy_count"])
    return {m: format(x, ".2f") for m, x in out.items()}


def shows(text: str, run: str, mode: str, value: str) -> bool:
    """`value` is a cell of the run's row in `text` (a terminal table, markdown, HTML or plain columns)."""
    cell = rf"(?:^|[\s|│>]){re.escape(value)}(?:$|[\s|│<])"
    rows = [line for line in text.splitlines() if run in line and mode in line]
    return any(re.search(cell, line) for line in rows)


def test_the_toy_metric_is_in_report_json_per_tap(report, registered):
    from parity.report.render import to_json

    data = json.loads(json.dumps(to_json(report)))
    assert data["metrics"]["toy_count"] == {"unit": "", "format": ".2f", "worse": "higher",
                                            "description": "elements compared, plus 0.25"}
    assert data["metrics"]["sqnr"]["unit"] == "dB" and data["metrics"]["err_p99"]["worse"] == "higher"
    for t in data["taps"]:
        assert t["metrics"]["toy_count"] == t["numel"] + 0.25, t["tap"]  # computed on that tap's pair
        assert set(t["metrics"]) == set(METRICS)
    assert {"max_abs", "stat", "bound", "cosine", "needed_atol"} <= set(data["taps"][0])  # the old keys stay


def test_the_toy_metric_is_in_every_view(report, registered):
    from rich.console import Console

    from parity.report.html import to_html
    from parity.report.render import print_terminal, to_json, to_markdown
    from parity.report.summary import run_rows

    want = expected(to_json(report)["taps"])
    assert set(want) == {"cumulative", "isolated"}
    rows = run_rows(report)
    assert [r.worst.split(" ")[1] for r in rows] == ["[p]", "[p]"]
    console = Console(record=True, width=240, color_system=None)
    print_terminal(report, console)
    views = {"terminal": console.export_text(), "report.md": to_markdown(report), "report.html": to_html(report)}
    for name, text in views.items():
        assert "toy_count" in text, name
        assert "sqnr" in text and "err_p50" in text and "err_p99" in text, name
        for mode, value in want.items():
            assert shows(text, "litgpt-style@float32", mode, value), (name, mode, value)
        for row in rows:  # the same wording of the fixed cells too ("[p]" is text, not terminal markup)
            assert shows(text, row.run, row.mode, row.worst), (name, row.worst)


def test_a_renderer_that_drops_the_metric_values_fails_the_check(report, registered, monkeypatch):
    """The checks above read the toy's formatted value in the run's row: its name alone does not pass."""
    from parity.report.render import to_json, to_markdown
    from parity.report.summary import RunRow

    want = expected(to_json(report)["taps"])
    cells = RunRow.cells
    monkeypatch.setattr(RunRow, "cells", lambda self: tuple("?" if c in want.values() else c for c in cells(self)))
    md = to_markdown(report)
    assert "toy_count" in md  # the header is still there
    assert not shows(md, "litgpt-style@float32", "cumulative", want["cumulative"])


def test_the_toy_metric_is_in_the_pytest_summary(report, registered, pytester):
    pytester.makepyfile(test_suite="from parity.test_layers import test_layers_cumulative_within_tolerance\n")
    r = pytester.runpytest("-p", "no:cacheprovider", "--parity-impls", "litgpt-style", "--parity-dtypes",
                           "float32", "--parity-report-dir", "out")
    r.assert_outcomes(passed=1)
    data = json.loads((pytester.path / "out" / "report.json").read_text())
    want = expected(data["taps"])
    summary = "\n".join(r.outlines)
    assert "toy_count" in summary and "sqnr (dB)" in summary
    assert shows(summary, "litgpt-style@float32", "cumulative", want["cumulative"]), summary
    for f in ("report.md", "report.html"):
        assert shows((pytester.path / "out" / f).read_text(), "litgpt-style@float32", "cumulative",
                     want["cumulative"]), f


def test_every_tap_result_holds_the_registered_metrics():
    a = np.arange(6.0).reshape(2, 3)
    assert set(compute(a, a)) == set(METRICS)
    assert compute(a, a)["sqnr"] == math.inf


def test_a_reduced_tap_measures_the_rows_both_sides_hold():
    from tests.test_trace_reduced import ROWS, _compare, _reduced, _taps

    bad = _taps()
    bad["layers.0.out"][int(ROWS[5]), 3] += 1e-3
    full = _compare(_taps(), bad)["layers.0.out"]
    red = _compare(_reduced(_taps()), _reduced(bad))["layers.0.out"]
    assert full.metrics == compute(bad["layers.0.out"], _taps()["layers.0.out"])
    assert red.metrics == compute(bad["layers.0.out"][ROWS], _taps()["layers.0.out"][ROWS])
    # the same one error against the signal of fewer rows
    assert math.isfinite(red.metrics["sqnr"]) and red.metrics["sqnr"] < full.metrics["sqnr"]
