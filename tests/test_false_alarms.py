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
from parity.strategies import gemma_specs, token_prompts, weight_profiles

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


def test_strategies_refuse_bad_bounds():
    with pytest.raises(InvalidArgument, match="families"):
        gemma_specs(families=(4,)).example()
    with pytest.raises(InvalidArgument, match="layers"):
        gemma_specs(min_layers=3, max_layers=1).example()
    from parity.presets import PRESETS

    with pytest.raises(InvalidArgument, match="max_position"):
        token_prompts(PRESETS["tiny-gemma"], max_len=10_000).example()
