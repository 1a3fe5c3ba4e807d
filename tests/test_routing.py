"""MoE routing is a choice: a flip at an honest near-tie is reported and passes, one at a clear margin fails.

The near-tie is made by hand: in layer 0 of tiny-gemma4-moe, expert 3's router row is expert 2's moved by
1e-3 of itself, so on every token the two probabilities lie within about 1e-3 of each other (relative):
within what bf16 rounding of the router logits can swap, far beyond what fp32 rounding can.
"""

import dataclasses

import numpy as np
import pytest

from parity.capture.trace import Trace
from parity.compare.routing import Flip, RoutingResult, as_tap_result, compare_routing, honest_gap

SPEC = "tiny-gemma4-moe"


def _trace(impl, dtype, probs, experts):
    taps = {"layers.0.moe.router_probs": np.asarray(probs, np.float64),
            "layers.0.moe.experts": np.asarray(experts, np.float64)}
    return Trace(impl=impl, version="", dtype=dtype, spec={"num_layers": 1}, weights_hash="w", tokens=[1, 2],
                 taps=taps)


def test_a_near_tie_flip_is_honest_in_bf16_and_clear_in_fp32_a_wide_one_always_clear():
    p = [[0.5, 0.2500, 0.2499, 0.0001],  # token 0: 2nd and 3rd within 1e-4
         [0.6, 0.3, 0.05, 0.05]]  # token 1: 2nd and 3rd 0.25 apart
    ref = _trace("ref", "float64", p, [[0, 1], [0, 1]])
    for dtype, honest_first in (("bfloat16", True), ("float32", False)):
        run = _trace("run", dtype, p, [[0, 2], [0, 2]])
        (r,) = compare_routing(ref, run)
        assert [f.token for f in r.flips] == [0, 1]
        assert r.flips[0].honest is honest_first and not r.flips[1].honest
        assert r.share == 1.0 and not r.passed
        tap = as_tap_result(r, None)
        assert not tap.passed and tap.mismatched == len(r.clear_flips)
    (same,) = compare_routing(ref, _trace("run", "bfloat16", p, [[1, 0], [0, 1]]))  # the order is no flip
    assert same.flips == () and same.passed and as_tap_result(same, None).passed


def test_honest_gap_grows_with_the_measured_noise():
    assert honest_gap(0.3, 0.3, None, 1.6e-2) < honest_gap(0.3, 0.3, 0.05, 1.6e-2)
    r = RoutingResult("x", "bfloat16", "cumulative", "p", 0, 4, (Flip(1, (0, 1), (0, 2), 0.5, 0.1),))
    assert "1 at a clear margin" in r.text() and r.to_json()["clear_flips"] == 1


def _near_tie_weights():
    from parity.model.presets import PRESETS
    from parity.model.weights import random_weights

    spec = PRESETS[SPEC]
    w = random_weights(spec, 0)
    t = dict(w.tensors)
    k = "model.layers.0.router.proj.weight"
    proj = np.array(t[k], copy=True)
    proj[3] = proj[2] * (1 + 1e-3)  # expert 3 ties expert 2 on every token, to 1e-3 of the logit
    t[k] = proj
    return spec, dataclasses.replace(w, tensors=t, _hash=None)


def _run(impl, adapter, dtype, weights, spec):
    from parity.harness import Request, run
    from parity.model.prompts import default_prompts

    return run(Request(spec=spec, impls=[impl], dtypes=[dtype], weights=weights,
                       adapters={impl: adapter} if adapter is not None else None,
                       prompts={"long": default_prompts(spec)["long"]}))


@pytest.mark.parametrize("impl", ["litgpt-style", "hf"])
def test_honest_near_tie_flips_are_reported_and_pass_in_bf16(impl):
    pytest.importorskip("torch")
    if impl == "hf":
        pytest.importorskip("transformers")
    spec, weights = _near_tie_weights()
    report = _run(impl, None, "bfloat16", weights, spec)
    flips = [r for r in report.routing if r.layer == 0 and r.flips]
    assert flips, "the hand-made near-tie flipped no token in bf16"
    assert all(f.honest for r in flips for f in r.flips), [r.text() for r in flips]
    assert report.verdict.status == "PASS", report.verdict.headline
    assert any("chose other experts" in line for line in report.verdict.routing_lines)
    assert all(r.passed for r in report.results if r.tap.endswith("moe.experts"))
    from parity.report.render import to_json, to_markdown

    data = to_json(report)
    assert data["routing"] and data["routing"][0]["layer"] == 0 and "honest near-tie" in to_markdown(report)


def test_a_clear_margin_flip_fails_with_its_cause():
    """The router's probabilities rounded to bf16 in an fp32 run collapse the near-tie to an exact tie, which
    top-k breaks by the lower id: a flip at a margin fp32 rounding cannot cross, named router-precision."""
    pytest.importorskip("torch")
    from parity.adapters.litgpt_style import LitgptStyleAdapter
    from parity.adapters.port_model import PortOptions

    spec, weights = _near_tie_weights()
    adapter = LitgptStyleAdapter(PortOptions(router_lowp="bfloat16"), name="router-bf16")
    report = _run("router-bf16", adapter, "float32", weights, spec)
    (r,) = [r for r in report.routing if r.layer == 0]
    assert r.clear_flips, r.text()
    (experts,) = [x for x in report.results if x.tap == "layers.0.moe.experts"]
    assert not experts.passed and "clear margin" in experts.reason
    assert report.verdict.status == "FAIL"
    (rv,) = report.verdict.runs
    assert rv.explanation is not None and rv.explanation.cause == "router-precision", report.verdict.headline


def test_trained_like_router_rows_come_in_near_tied_pairs():
    from parity.model.presets import PRESETS
    from parity.model.weight_profiles import ROUTER_TIE_GAP, router_near_ties

    spec = PRESETS[SPEC]
    name = "model.layers.0.router.proj.weight"
    rng = np.random.default_rng(0)
    whole = router_near_ties(spec, 0, name)(0, rng.standard_normal((spec.num_experts, spec.hidden_size)))
    rows = router_near_ties(spec, 0, name)(1, rng.standard_normal((1, spec.hidden_size)))  # another blocking
    assert np.array_equal(rows[0], whole[1])
    rel = np.abs(whole[1] / whole[0] - 1)
    assert ROUTER_TIE_GAP[0] * 0.99 <= rel.max() <= ROUTER_TIE_GAP[1] * 1.01 and np.allclose(rel, rel[0])
    assert np.allclose(whole[2], whole[3], rtol=0.1)  # 8 experts: pairs (0, 1) and (2, 3)
    assert not np.allclose(whole[4], whole[5], rtol=0.1)  # only a share of the experts is paired


def test_isolated_runs_leave_the_flipped_rows_out_of_that_layers_downstream_taps():
    """Isolated layers take the reference's input, so no replay: the flipped tokens' rows are left out of the
    layer's taps after the choice (and said so), the rest compared as usual."""
    pytest.importorskip("torch")
    from parity.harness import Request, run
    from parity.model.prompts import default_prompts

    spec, weights = _near_tie_weights()
    report = run(Request(spec=spec, impls=["litgpt-style"], dtypes=["bfloat16"], weights=weights, mode="isolated",
                         prompts={"long": default_prompts(spec)["long"]}))
    (r,) = [r for r in report.routing if r.layer == 0]
    assert r.flips and r.accounted == "excluded" and all(f.honest for f in r.flips), r.text()
    (branch,) = [x for x in report.results if x.tap == "layers.0.moe_branch"]
    assert branch.passed and f"{len(r.honest_flips)} honestly flipped token row(s) left out" in branch.reason
    assert branch.numel == (48 - len(r.honest_flips)) * spec.hidden_size
    assert report.verdict.status == "PASS", report.verdict.headline


def test_decoding_through_a_near_tie_is_a_routing_comparison_not_a_float_one():
    """Decode steps flip at the near-tie too (against the reference's full forward): reported per step, the
    flipped steps' rows left out of that layer's downstream taps; before, moe.experts failed as floats."""
    pytest.importorskip("torch")
    from parity.harness import Request, run

    spec, weights = _near_tie_weights()
    report = run(Request(spec=spec, impls=["litgpt-style"], dtypes=["bfloat16"], weights=weights,
                         prompts={"short": [2, 17, 301, 5, 88, 260, 9, 140]}, decode=12))
    decoded = [r for r in report.routing if r.mode == "decode" and r.flips]
    assert decoded and all(r.accounted == "excluded" and r.passed for r in decoded), [r.text() for r in decoded]
    assert report.verdict.status == "PASS", report.verdict.headline
