"""The HF adapter records what transformers computes, through hooks, and nothing of its own."""

import numpy as np
import pytest

from parity.adapters import get_adapter
from parity.errors import ParityInputError
from parity.model.taps import tap_order


@pytest.fixture(scope="module")
def hf():
    return get_adapter("hf")


def test_every_canonical_tap(hf, tiny, tiny_weights, tokens):
    taps = hf.run(hf.build(tiny, tiny_weights, "float32"), tokens).taps
    # execution order differs (act before up); capture reorders. Scores are inline in HF's eager attention.
    assert set(taps) == {t for t in tap_order(tiny) if not t.endswith("attn.scores")}
    assert taps["logits"].shape == (len(tokens), tiny.vocab_size)
    assert taps["layers.0.mlp.gate"].shape == (len(tokens), tiny.intermediate_size)


def test_low_precision_model_keeps_rope_inv_freq_in_fp32(hf, tiny, tiny_weights):
    import torch

    model = hf.build(tiny, tiny_weights, "bfloat16")
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16


def test_patched_library_block_shows_in_the_trace(hf, tiny, tiny_weights, tokens, monkeypatch):
    """A change patched into transformers' own code must reach the trace: hooks, not re-computation."""
    from transformers.models.gemma import modeling_gemma

    model = hf.build(tiny, tiny_weights, "float32")
    before = hf.run(model, tokens).taps

    def swapped(self, x):  # GELU on the up projection: the geglu-swapped divergence
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    monkeypatch.setattr(modeling_gemma.GemmaMLP, "forward", swapped)
    after = hf.run(model, tokens).taps
    assert np.array_equal(before["layers.0.mlp.gate"], after["layers.0.mlp.gate"])
    assert not np.allclose(before["layers.0.mlp.act"], after["layers.0.mlp.act"])
    assert not np.allclose(before["logits"], after["logits"])

    orig = modeling_gemma.GemmaDecoderLayer.forward

    def doubled_residual(self, hidden_states, *a, **kw):  # glue between sub-layers changed
        out = orig(self, hidden_states, *a, **kw)  # a tensor in transformers 5, a tuple in 4.x
        return (out[0] * 2, *out[1:]) if isinstance(out, tuple) else out * 2

    monkeypatch.setattr(modeling_gemma.GemmaDecoderLayer, "forward", doubled_residual)
    glued = hf.run(model, tokens).taps
    assert np.allclose(glued["layers.0.out"], 2 * after["layers.0.out"])


def test_hf_refuses_what_it_cannot_build(hf, tiny):
    with pytest.raises(ParityInputError, match="rewrites hidden_act"):
        hf.check(tiny.replace(gelu_approximate="none"), "float32")
    with pytest.raises(ParityInputError, match="norm_unit_offset"):
        hf.check(tiny.replace(norm_unit_offset=False), "float32")
