"""A third-party-style Gemma (tests/third_party_gemma.py) through the documented interface, both modes.

Keyword-only and repeated attention inputs, a function GELU, a functional tied head and a library-built
rotary cache: every pattern must be captured and fed correctly, so the correct implementation passes in
both modes, and a fault in it is still found.
"""

import pytest

from parity.harness import Request, run

TOKENS = {"p": [2, 17, 301, 5, 88, 260, 9, 140, 33, 7, 412, 3]}


@pytest.fixture
def tp():
    """The third-party module, imported by the tests that run it: it imports torch, and collecting does not."""
    from tests import third_party_gemma

    return third_party_gemma


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_third_party_implementation_passes_in_both_modes(tp, tiny, dtype):
    a = tp.adapter()
    rep = run(Request(spec=tiny, impls=[a.name], dtypes=[dtype], prompts=TOKENS, mode="both", adapters={a.name: a}))
    assert rep.passed, rep.verdict.headline
    for rv in rep.verdict.runs:
        got = {r.tap for r in rep.run_results(rv.impl, rv.dtype, rv.mode)}
        assert {"layers.0.mlp.act", "logits", "layers.3.attn"} <= got and rv.first is None
    iso = {r.tap: r for r in rep.run_results(a.name, dtype, "isolated")}
    cum = {r.tap: r for r in rep.run_results(a.name, dtype, "cumulative")}
    # fed: the isolated error at the last layer is local, smaller than the accumulated one
    assert iso["layers.3.out"].stat < cum["layers.3.out"].stat


def test_a_fault_in_the_function_gelu_is_found_in_both_modes(tp, tiny, monkeypatch):
    import torch.nn.functional as F

    monkeypatch.setattr(tp, "gelu_tanh", lambda x: F.gelu(x))  # exact GELU, as the first HF release had
    a = tp.adapter()
    rep = run(Request(spec=tiny, impls=[a.name], dtypes=["float32"], prompts=TOKENS, mode="both",
                      adapters={a.name: a}))
    assert not rep.passed
    firsts = {rv.mode: rv.first.tap for rv in rep.verdict.runs}
    assert firsts == {"cumulative": "layers.0.mlp.act", "isolated": "layers.0.mlp.act"}
    (rv,) = [r for r in rep.verdict.runs if r.mode == "cumulative"]
    assert rv.explanation.cause == "gelu-exact"
