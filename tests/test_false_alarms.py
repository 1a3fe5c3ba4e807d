"""False alarms: correct implementations on hypothesis-generated tiny specs and prompts never diverge.

Every installed built-in that can express the drawn spec runs in float32,
bfloat16 and float16, cumulative and isolated, on the default and the
trained-like weights (keras-hub refuses some epsilons and rope bases, and is
skipped, as the report says; it is left out where the query scalar is not
head_dim, its known divergence). CI draws a few
examples; PARITY_HYPOTHESIS_EXAMPLES=300 is the long run.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from parity.harness import Request, run
from parity.suite.strategies import gemma_specs, token_prompts, weight_profiles

EXAMPLES = int(os.environ.get("PARITY_HYPOTHESIS_EXAMPLES", "6"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 10,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=gemma_specs(), profile=weight_profiles(), data=st.data())
def test_correct_implementations_never_diverge(spec, profile, data):
    tokens = data.draw(token_prompts(spec, min_len=2, max_len=40), label="tokens")
    impls = None  # every installed built-in that can express the spec
    if spec.query_pre_attn_scalar not in (None, spec.head_dim):
        # keras-hub 0.32 drops a query scalar other than head_dim (a known divergence, see README findings)
        from parity.adapters import get_adapter
        from parity.errors import Unsupported

        impls = ["litgpt-style"]
        try:
            for d in ("float32", "bfloat16", "float16"):
                get_adapter("hf").check(spec, d)
            impls.append("hf")
        except Unsupported:
            pass  # transformers refuses this head count: skipped, as the report would skip it
    report = run(Request(spec=spec, impls=impls, dtypes=["float32", "bfloat16", "float16"], prompts={"p": tokens},
                         mode="both", weights_profile=profile))
    bad = [r.message() for r in report.results if not r.passed][:3]
    assert report.passed, f"false alarm on {spec} ({profile} weights): {report.divergent_causes[:2]} {bad}"


@settings(max_examples=max(1, EXAMPLES // 2), deadline=None, derandomize=EXAMPLES <= 10,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=gemma_specs(), profile=weight_profiles(), data=st.data())
def test_correct_caches_never_diverge_while_decoding(spec, profile, data):
    """Decoding past the window through the port's ring buffer and transformers' caches, on drawn specs."""
    tokens = data.draw(token_prompts(spec, min_len=1, max_len=24), label="tokens")
    window = spec.sliding_window or 4
    steps = data.draw(st.integers(1, min(2 * window + 2, spec.max_position - len(tokens))), label="steps")
    impls = ["litgpt-style"]
    from parity.adapters import get_adapter
    from parity.errors import Unsupported

    try:
        for d in ("float32", "bfloat16", "float16"):
            get_adapter("hf").check(spec, d)
        impls += ["hf", "hf-static"]
    except Unsupported:
        pass  # transformers refuses this spec: the port's own cache is still checked against its full forward
    report = run(Request(spec=spec, impls=impls, dtypes=["float32", "bfloat16", "float16"], prompts={"p": tokens},
                         decode=steps, weights_profile=profile))
    bad = [r.message() for r in report.results if not r.passed][:3]
    assert report.passed, f"false alarm decoding {steps} steps on {spec} ({profile} weights): " \
                          f"{report.divergent_causes[:2]} {bad}"


def test_strategies_refuse_bad_bounds():
    with pytest.raises(InvalidArgument, match="families"):
        gemma_specs(families=(4,)).example()
    with pytest.raises(InvalidArgument, match="layers"):
        gemma_specs(min_layers=3, max_layers=1).example()
    from parity.model.presets import PRESETS

    with pytest.raises(InvalidArgument, match="max_position"):
        token_prompts(PRESETS["tiny-gemma"], max_len=10_000).example()
