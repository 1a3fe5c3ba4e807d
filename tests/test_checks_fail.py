"""Every parity check passes on the correct port and fails on a deliberately wrong variant."""

import pytest

from parity.gate import checks
from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.capture.runner import capture

DTYPES = ["float32", "bfloat16"]


def _trace(adapter, spec, weights, dtype, tokens):
    return capture(adapter, spec, weights, dtype, {"p": tokens})[0]


@pytest.fixture(scope="module", params=DTYPES)
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def good(tiny, tiny_weights, tokens, dtype):
    return _trace(LitgptStyleAdapter(), tiny, tiny_weights, dtype, tokens)


def test_checks_pass_on_the_correct_port(good, tiny, tiny_weights):
    checks.check_norm_placement(good, tiny)
    checks.check_norm_unit_offset(good, tiny, tiny_weights.tensors)
    checks.check_geglu(good, tiny)
    checks.check_gelu_tanh(good, tiny)
    checks.check_embedding_scale(good, tiny, tiny_weights.tensors)


@pytest.mark.parametrize("variant,check,needle,cause", [
    ("exact_gelu", "check_gelu_tanh", "exact", "gelu-exact"),
    ("swapped_geglu", "check_geglu", "geglu-swapped", "geglu-swapped"),
    ("swapped_geglu", "check_gelu_tanh", "mlp.up", "geglu-swapped"),
    ("sandwich_norms", "check_norm_placement", "post-attention norm", "norm-placement"),
    ("no_unit_offset", "check_norm_unit_offset", "norm-unit-offset-missing", "norm-unit-offset-missing"),
    ("unscaled_embedding", "check_embedding_scale", "embed-scale-missing", "embed-scale-missing"),
])
def test_check_fails_on_wrong_variant(variant, check, needle, cause, tiny, tiny_weights, tokens, dtype):
    from tests import variants  # here, not at import: it imports torch, and collecting imports no framework

    trace = _trace(getattr(variants, variant)(), tiny, tiny_weights, dtype, tokens)
    fn = getattr(checks, check)
    args = (trace, tiny, tiny_weights.tensors) if check in ("check_norm_unit_offset", "check_embedding_scale") \
        else (trace, tiny)
    with pytest.raises(checks.CheckFailure, match=needle) as e:
        fn(*args)
    assert cause in e.value.causes  # typed, for waivers and tools: not parsed out of the message
