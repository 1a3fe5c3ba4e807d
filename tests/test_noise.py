"""The honest-noise model: measured in the run, it keeps honest rounding from failing and faults from passing."""

import numpy as np
import pytest

from parity.harness import Request, run
from parity.numerics.metrics import excess, row_norms
from parity.numerics.tolerances import NOISE_MARGIN, TOLERANCES, Tolerance

TOKENS = {"p": [2, 17, 301, 5, 88, 260, 9, 140, 33, 7, 412, 3]}


def _tight(dtype: str) -> dict:
    """The table with a floor far below honest bf16 rounding, so that only the honest model can pass a tap."""
    return {**TOLERANCES, dtype: Tolerance(1e-6, TOLERANCES[dtype].rtol, "test: a floor below honest rounding")}


def test_every_run_measures_the_noise_of_correct_variants(tiny):
    rep = run(Request(spec=tiny, impls=["litgpt-style"], dtypes=["bfloat16"], prompts=TOKENS, mode="both"))
    assert rep.noise is not None and len(rep.noise.members) == 4
    for mode in ("cumulative", "isolated"):
        assert rep.noise.at("bfloat16", mode, "p", "layers.0.mlp.act") > 0
    # the members are correct: each within its own ensemble's bound
    assert rep.passed and all(r.basis in ("honest", "table") and r.noise is not None for r in rep.results)


def test_honest_rounding_beyond_the_table_passes_and_says_so(tiny):
    # a floor below bf16 rounding: the fixed table alone fails every correct bf16 run ...
    table_only = run(Request(spec=tiny, impls=["hf"], dtypes=["bfloat16"], prompts=TOKENS, tolerances=_tight("bfloat16"),
                             noise_members=0))
    assert not table_only.passed and table_only.verdict.headline.startswith("FAIL")
    # ... the honest model passes it: the port's variants err as much here, in this run
    rep = run(Request(spec=tiny, impls=["hf"], dtypes=["bfloat16"], prompts=TOKENS, tolerances=_tight("bfloat16")))
    assert rep.passed, rep.verdict.headline
    (rv,) = rep.verdict.runs
    assert rv.status == "PASS" and rv.honest_taps > 0 and rv.basis == "honest"
    assert "honest rounding" in rep.verdict.headline
    assert all(r.bound == pytest.approx(max(r.floor, NOISE_MARGIN * r.noise)) for r in rep.results)


def test_a_fault_beyond_honest_noise_still_fails(tiny):
    # rope base 20000 instead of 10000: beyond the table and beyond NOISE_MARGIN x the honest noise
    rep = run(Request(spec=tiny, impls=["rope-base-fault"], dtypes=["bfloat16"], prompts=TOKENS,
                      tolerances=_tight("bfloat16"), adapters={"rope-base-fault": _rope_base_fault()}))
    assert not rep.passed
    failing = [r for r in rep.results if not r.passed]
    assert rep.verdict.lead.first.tap == "rope.cos"  # every correct variant rounds the table alike: noise 0
    beyond = [r for r in failing if r.basis == "honest"]
    assert beyond and all(r.stat > NOISE_MARGIN * r.noise for r in beyond)
    assert "layers.0.attn.scores" in {r.tap for r in beyond}


def _rope_base_fault():
    from parity.adapters.litgpt_style import LitgptStyleAdapter

    return LitgptStyleAdapter(spec_changes={"rope_base": 20_000.0}, name="rope-base-fault")


def test_one_massive_activation_does_not_loosen_the_other_rows():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 64))
    ref[0, 5] = 5e4  # a BOS channel thousands of times the rest
    bad = ref.copy()
    bad[3] += 0.5  # half an RMS off on an ordinary token
    # against each row's own RMS the error is 0.5; against the whole tap's RMS (inflated ~700x) it would vanish
    assert excess(bad, ref, 0.0) == pytest.approx(0.5 / np.sqrt(np.mean(ref[3] ** 2)), rel=1e-9)
    whole = np.sqrt(np.mean(ref**2))
    assert 0.5 / whole < 1e-2 < excess(bad, ref, 0.0)
    assert row_norms(ref).shape == (8, 1)


def test_a_counterfactual_that_cannot_run_is_reported_not_dropped(tiny, monkeypatch):
    from parity.diagnose import counterfactuals
    from parity.diagnose.counterfactuals import Counterfactual

    real = counterfactuals.candidates
    broken = Counterfactual("rope-layout", "a variant that cannot be built", options=(("no_such_option", True),))
    monkeypatch.setattr(counterfactuals, "candidates", lambda spec: [broken, *real(spec)])
    rep = run(Request(spec=tiny, impls=["rope-base-fault"], dtypes=["float32"], prompts=TOKENS,
                      adapters={"rope-base-fault": _rope_base_fault()}))
    (rv,) = rep.verdict.runs
    assert rv.explanation.cause == "rope-base"  # the others are still ranked
    monkeypatch.setattr(counterfactuals, "candidates", lambda spec: [broken])
    monkeypatch.setattr(counterfactuals, "swap_candidates", lambda *a: [])
    rep = run(Request(spec=tiny, impls=["rope-base-fault"], dtypes=["float32"], prompts=TOKENS,
                      adapters={"rope-base-fault": _rope_base_fault()}))
    (rv,) = rep.verdict.runs
    ev = rv.explanation.evidence
    assert rv.explanation.cause == "unexplained" and "1 candidate(s) could not be run" in ev
    assert "a variant that cannot be built" in ev and "TypeError" in ev


def test_the_first_divergence_is_in_forward_order_over_every_prompt(tiny):
    """A fault whose first tap diverges only on the long prompt is still the first divergence, though the
    short prompt's results come first: the verdict, the headline and the diagnosis agree on it."""
    from parity.model.prompts import default_prompts

    prompts = default_prompts(tiny)
    rep = run(Request(spec=tiny, impls=["rope-base-fault"], dtypes=["float32"], prompts=prompts,
                      adapters={"rope-base-fault": _rope_base_fault()}))
    (rv,) = rep.verdict.runs
    from parity.model.taps import tap_order

    order = {t: i for i, t in enumerate(tap_order(tiny))}
    failing = [r for r in rep.run_results(rv.impl, rv.dtype, rv.mode) if not r.passed]
    assert rv.first.tap == min(failing, key=lambda r: order[r.tap]).tap
    assert rv.explanation is not None and rv.explanation.explains == rv.first.tap
    assert rep.first_divergences() == [rv.first] and rv.first.tap in rep.verdict.headline
