"""The probe registry: a new probe is one registration, and its result reaches every output.

A toy probe registered here (and removed after) runs in a real harness run of the
lit-gpt-style port against a broken variant of it, and its result is found in
report.json, the terminal, report.md, report.html and the pytest summary. A cause
id the catalogue lacks fails at registration, and a candidate's cause is an id,
never a label.
"""

import json
import math

import numpy as np
import pytest

from parity.diagnose import probes
from parity.diagnose.probes import (PROBES, Candidate, Probe, ProbeDefinitionError, ProbeSpec, UnknownCauseError,
                                    decide, register, run_probes, unregister)
from parity.diagnose.probes._evidence import SUBNORMAL, trusted
from parity.harness import PORT, Request, run
from parity.model.presets import PRESETS
from parity.model.prompts import default_prompts
from parity.numerics.metrics import round_to
from tests.variants import unscaled_embedding

TOY = "toy-embed-scale"
TOY_CAUSE = "weights-swapped"  # a catalogue id no built-in probe names, so the toy's entry is its own


def toy_probe(trace, spec, weights) -> Probe:
    """Is `embed` the embedding rows times sqrt(hidden)? Decided with the shared ending, as a real probe is."""
    y = trace.taps.get("embed")
    if y is None or "model.embed_tokens.weight" not in weights:
        return Probe.cannot_tell(TOY, "embed", "embed or the embedding weights missing")
    rows = round_to(np.asarray(weights["model.embed_tokens.weight"], np.float64)[np.asarray(trace.tokens)],
                    trace.dtype)
    cands = [Candidate("rows * sqrt(hidden)", None, rows * math.sqrt(spec.hidden_size)),
             Candidate("rows as they are", TOY_CAUSE, rows)]
    keep = trusted(trace.dtype, y, *(c.values for c in cands))
    return decide(TOY, "embed", y, cands, trace.dtype, keep, SUBNORMAL, 0.98, correct=cands[0],
                  says="toy says the embedding is {best}", unexplained="toy: no candidate (best {score:.1%})")


@pytest.fixture
def toy():
    spec = register(ProbeSpec(TOY, toy_probe, "embed", per_layer=False, causes=(TOY_CAUSE, "unexplained")))
    try:
        yield spec
    finally:
        unregister(TOY)
    assert TOY not in PROBES


@pytest.fixture(scope="module")
def report():
    """The port and its unscaled-embedding variant in float32, on the tiny Gemma (a few seconds)."""
    spec = PRESETS["tiny-gemma"]
    broken = unscaled_embedding()
    register(ProbeSpec(TOY, toy_probe, "embed", per_layer=False, causes=(TOY_CAUSE, "unexplained")))
    try:  # registered for the run only: the tests below register it again where they need it
        return run(Request(spec=spec, impls=[PORT, broken.name], dtypes=["float32"], adapters={broken.name: broken},
                           prompts={"short": default_prompts(spec)["short"]}))
    finally:
        unregister(TOY)


def _toy_rows(data: dict) -> dict:
    return {(p["impl"], p["dtype"]): p for p in data["probes"] if p["name"] == TOY}


def test_the_toy_probe_reaches_every_output(report, tmp_path, capsys):
    from rich.console import Console

    from parity.report.cli import write_report
    from parity.report.render import print_terminal
    from parity.suite.session import ParitySession

    # report.json: one row per cumulative run, deciding per implementation
    write_report(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    rows = _toy_rows(data)
    assert rows[("unscaled-embedding", "float32")]["cause"] == TOY_CAUSE
    assert rows[("unscaled-embedding", "float32")]["verdict"] == "toy says the embedding is rows as they are"
    assert rows[(PORT, "float32")]["cause"] is None
    assert set(rows[(PORT, "float32")]) == {"impl", "dtype", "name", "tap", "verdict", "cause", "evidence", "finding"}
    mine = [d for d in data["diagnosis"] if d["cause"] == TOY_CAUSE]
    assert len(mine) == 1 and mine[0]["impl"] == "unscaled-embedding" and mine[0]["source"] == "probe"
    said = f"{TOY} probe: embed: toy says the embedding is rows as they are"
    assert mine[0]["evidence"].startswith(said)
    # report.md and report.html: the diagnosis table's evidence
    assert said in (tmp_path / "report.md").read_text()
    assert said in (tmp_path / "report.html").read_text()
    # the terminal
    console = Console(record=True, width=400)
    print_terminal(report, console)
    assert said in console.export_text()
    # the pytest summary names the causes of each run: the toy's is among the broken run's
    session = object.__new__(ParitySession)  # the summary reads only these; no pytest config is needed for it
    session.report, session.applied, session.gates, session.update_baseline, session.written = report, None, [], \
        False, []
    line = next(s for s in session.summary()["runs"] if s.startswith("unscaled-embedding@float32"))
    assert TOY_CAUSE in line
    capsys.readouterr()


def test_without_the_toy_its_result_is_nowhere(report):
    """The check above can fail: the same trace probed with the toy unregistered has no toy row."""
    assert TOY not in PROBES
    trace = report.trace("unscaled-embedding", "float32", "short", "cumulative")
    weights = report.weights.tensors
    assert not [p for p in run_probes(trace, report.spec, weights) if p.name == TOY]


def test_a_registered_probe_runs_in_forward_order_of_its_tap(report, toy):
    trace = report.trace("unscaled-embedding", "float32", "short", "cumulative")
    got = run_probes(trace, report.spec, report.weights.tensors)
    names = [p.name for p in got]
    # at `embed` the built-in embedding probe was registered first; the toy follows it, before rope.cos
    assert names[:3] == ["embedding", TOY, "rope-precision"], names[:4]
    toy_result = got[1]
    assert toy_result.status == "cause" and toy_result.cause == TOY_CAUSE


def test_an_unknown_cause_id_fails_at_registration():
    before = dict(PROBES)
    with pytest.raises(UnknownCauseError, match="'gelu-exakt'.*causes.py"):
        register(ProbeSpec("typo", toy_probe, "embed", per_layer=False, causes=("gelu-exakt",)))
    assert PROBES == before
    with pytest.raises(ProbeDefinitionError, match="already registered"):
        register(ProbeSpec("gelu", toy_probe, "embed", per_layer=False, causes=("gelu-exact",)))
    with pytest.raises(ProbeDefinitionError, match="per_layer"):
        ProbeSpec("x", toy_probe, "embed", per_layer=True, causes=("gelu-exact",))


def test_a_candidate_cause_is_an_id_never_a_label():
    assert Candidate("exact, rounded once", "gelu-exact").cause == "gelu-exact"
    with pytest.raises(UnknownCauseError, match="'exact, rounded once'"):
        Candidate("exact, rounded once", "exact, rounded once")
    # every built-in probe's candidates carry ids: the GELU's, on a real input
    from parity.diagnose.probes.mlp import gelu_candidates

    assert [c.cause for c in gelu_candidates(np.linspace(-3, 3, 8), "bfloat16")] == [None, "gelu-exact", "act-lowp"]


def test_status_is_set_where_the_probe_decides_and_must_agree_with_the_cause():
    assert Probe.cannot_tell("p", "t", "why").status == "cannot-tell"
    assert Probe.of("p", "t", "v", None).status == "ok"
    assert Probe.of("p", "t", "v", "gelu-exact").status == "cause"
    with pytest.raises(ProbeDefinitionError):
        Probe("p", "t", "ok", "v", "gelu-exact")
    with pytest.raises(ProbeDefinitionError):
        Probe("p", "t", "cause", "v", None)
    with pytest.raises(UnknownCauseError):
        Probe.named("p", "t", "v", cause="gelu-exakt")
    # a "cannot tell" sentence does not make the status: only the constructor does
    assert Probe.ok("p", "t", "cannot tell: this is only a sentence").status == "ok"


def test_a_probe_naming_a_cause_it_did_not_declare_fails_the_run(report):
    trace = report.trace("unscaled-embedding", "float32", "short", "cumulative")
    register(ProbeSpec(TOY, toy_probe, "embed", per_layer=False, causes=("unexplained",)))
    try:
        with pytest.raises(ProbeDefinitionError, match=f"{TOY_CAUSE}.*does not declare"):
            run_probes(trace, report.spec, report.weights.tensors)
    finally:
        unregister(TOY)


def test_every_builtin_probe_is_registered():
    # every module of the package is imported, in name order, and registers its probes
    assert list(PROBES) == ["rope_precision", "softmax", "attention_mask", "embedding", "lm_head", "gelu", "geglu",
                            "geglu-fused", "moe-router-probs", "moe-router-weights", "moe-experts", "attn_norm", "norm_placement", "layer_norms", "final_norm"]
    assert probes.run_probes is run_probes
