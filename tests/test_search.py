"""One ranking of counterfactuals (parity.diagnose.search.rank): a candidate that raises is a failed candidate,
reported with its error on the prefill path as on the decode path (tests/test_trace_pairing.py), never dropped."""

import pytest

from parity.diagnose.counterfactuals import Counterfactual
from parity.diagnose.search import UNCHANGED, rank
from parity.harness import Request, run

A, B, C, D = (Counterfactual(c, label) for c, label in
              (("rope-base", "a"), ("query-scale", "b"), ("gelu-exact", "c"), ("act-lowp", "d")))


def _scores(table: dict):
    """reproduce() from a table of scores: a candidate mapped to an exception raises it."""
    def reproduce(cf):
        got = table[cf.label if cf is not None else UNCHANGED]
        if isinstance(got, Exception):
            raise got
        return got
    return reproduce


def test_rank_orders_by_score_and_keeps_every_failure():
    r = rank([A, B, C, D], _scores({UNCHANGED: 40.0, "a": 3.0, "b": RuntimeError("cannot build"), "c": 0.5,
                                    "d": None}))
    assert (r.best, r.score, r.runner_up, r.runner_up_score, r.baseline) == (C, 0.5, A, 3.0, 40.0)
    assert r.ranked == (("c", 0.5), ("a", 3.0)) and r.explains and not r.honest
    assert r.failed == (("b", "RuntimeError: cannot build"),
                        ("d", "no tap compared: the variant's trace shares none of the implementation's taps"))
    assert r.failures()[0] == {"candidate": "b", "error": "RuntimeError: cannot build"}


def test_rank_reports_a_baseline_that_raises_and_still_ranks():
    r = rank([A, B], _scores({UNCHANGED: ValueError("no port"), "a": 0.2, "b": 0.9}))
    assert r.baseline is None and r.failed == ((UNCHANGED, "ValueError: no port"),)
    assert r.best is A and r.explains and r.runner_up is B


def test_rank_stops_at_an_honest_baseline_without_listing_candidates():
    def never():
        pytest.fail("candidates were listed though the unchanged port reproduces the trace")
        yield A

    r = rank(never(), _scores({UNCHANGED: 0.4}))
    assert r.honest and not r.explains and r.best is None and r.ranked == () and r.failed == ()


def test_a_prefill_counterfactual_that_raises_is_reported_beside_the_cause(tiny, monkeypatch):
    """Named or not, the entry lists the candidate that could not run with its error (before, only an
    unexplained entry mentioned failures; one beside a named cause vanished)."""
    from parity.adapters.litgpt_style import LitgptStyleAdapter
    from parity.diagnose import counterfactuals

    real = counterfactuals.candidates
    broken = Counterfactual("rope-layout", "a variant that cannot be built", options=(("no_such_option", True),))
    monkeypatch.setattr(counterfactuals, "candidates", lambda spec: [broken, *real(spec)])
    fault = LitgptStyleAdapter(spec_changes={"rope_base": 20_000.0}, name="rope-base-fault")
    rep = run(Request(spec=tiny, impls=[fault.name], dtypes=["float32"], adapters={fault.name: fault},
                      prompts={"p": [2, 17, 301, 5, 88, 260, 9, 140, 33, 7, 412, 3]}))
    (entry,) = [d.to_json() for d in rep.diagnosis if d.explains is not None]
    assert entry["cause"] == "rope-base" and entry["source"] == "counterfactual"
    (failed,) = entry["failed"]
    assert failed["candidate"] == "a variant that cannot be built" and failed["error"].startswith("TypeError")
    assert "1 candidate(s) could not be run (first: 'a variant that cannot be built': TypeError" in entry["evidence"]
