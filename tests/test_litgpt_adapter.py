"""The released-litgpt adapter records what litgpt computes, through hooks, and nothing of its own."""

import sys

import numpy as np
import pytest

litgpt = pytest.importorskip("litgpt")

from parity.adapters import get_adapter  # noqa: E402
from parity.adapters import litgpt_pkg  # noqa: E402
from parity.errors import BackendMissing, ParityInputError  # noqa: E402
from parity.model.presets import PRESETS  # noqa: E402
from parity.model.prompts import default_prompts  # noqa: E402
from parity.model.taps import tap_names  # noqa: E402
from parity.model.weights import random_weights  # noqa: E402

FAMILIES = ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"]
# fp32 agreement with the float64 port, as max abs error over the reference tap's RMS;
# measured 2.4e-5 at worst (tiny-gemma3 layers.3.mlp.hidden), 1e-6..4e-6 at act, last out and logits
FP32_REL = 1e-4
# litgpt 0.4.13 fields: Gemma 1/2 only, sliding window on all or even layers
LITGPT_04_FIELDS = {
    "attention_logit_softcapping", "attention_scores_scalar", "bias", "block_size", "final_logit_softcapping",
    "gelu_approximate", "head_size", "hf_config", "intermediate_size", "lm_head_bias", "mlp_class_name",
    "n_embd", "n_expert", "n_expert_per_token", "n_head", "n_layer", "n_query_groups", "name",
    "norm_class_name", "norm_eps", "padded_vocab_size", "padding_multiple", "parallel_residual",
    "post_attention_norm", "post_mlp_norm", "rope_base", "rope_condense_ratio", "rotary_percentage",
    "scale_embeddings", "shared_attention_norm", "sliding_window_layer_placing", "sliding_window_size",
    "vocab_size",
}


@pytest.fixture(scope="module")
def lit():
    return get_adapter("litgpt")


@pytest.fixture(scope="module")
def port():
    return get_adapter("litgpt-style")


@pytest.fixture(scope="module")
def case():
    """spec name -> (spec, weights, long prompt, float64 port taps), built once per family."""
    port = get_adapter("litgpt-style")
    cache = {}

    def get(name):
        if name not in cache:
            spec = PRESETS[name]
            w = random_weights(spec, seed=0)
            tokens = default_prompts(spec)["long"]  # longer than the tiny sliding window (16)
            ref = port.run(port.build(spec, w, "float64"), tokens).taps
            cache[name] = (spec, w, tokens, ref)
        return cache[name]

    return get


def supported(lit, spec):
    """Skip a family the installed litgpt cannot build (0.4.x has no Gemma 3): the refusal is tested below."""
    try:
        lit.check(spec, "float32")
    except ParityInputError as e:
        pytest.skip(f"installed litgpt: {e}")
    return spec


def rel_err(got, ref):
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)) / np.sqrt(np.mean(ref ** 2)))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_canonical_tap(lit, case, name):
    spec, w, tokens, _ = case(name)
    supported(lit, spec)
    result = lit.run(lit.build(spec, w, "float32"), tokens)
    assert set(tap_names(spec)) <= set(result.taps)
    # only the attention probabilities may be missing: torch SDPA never materialises them
    assert all(t.endswith(".attn.probs") for t in result.unavailable)
    if spec.attn_softcap is not None:  # the eager softcap path computes them with F.softmax
        assert not result.unavailable
        assert result.taps["layers.0.attn.probs"].shape == (spec.num_heads, len(tokens), len(tokens))
    assert result.taps["logits"].shape == (len(tokens), spec.vocab_size)
    assert result.taps["layers.0.mlp.act"].shape == (len(tokens), spec.intermediate_size)
    assert result.taps["embed"].shape == (len(tokens), spec.hidden_size)


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_agrees_with_the_float64_port_at_every_tap(lit, case, name):
    spec, w, tokens, ref = case(name)
    supported(lit, spec)
    taps = lit.run(lit.build(spec, w, "float32"), tokens).taps
    errors = {t: rel_err(taps[t], ref[t]) for t in tap_names(spec)}
    worst = max(errors, key=errors.get)
    assert errors[worst] < FP32_REL, f"{worst}: {errors[worst]:.3g} of the tap's RMS"


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_rounds_the_norm_offset(lit, case, name):
    """litgpt computes (1 + w) in the parameter dtype: norm-unit-offset-lowp, visible at the first norm."""
    from parity.adapters.litgpt_style import LitgptStyleAdapter
    from parity.adapters.port_model import PortOptions

    spec, w, tokens, ref = case(name)
    supported(lit, spec)
    model = lit.build(spec, w, "bfloat16")
    assert "(1 + w) in bfloat16" in lit.effective(model)["library"]["norm"]
    got = lit.run(model, tokens).taps
    lowp = LitgptStyleAdapter(PortOptions(offset_lowp=True))
    fault = lowp.run(lowp.build(spec, w, "bfloat16"), tokens).taps
    assert np.array_equal(got["layers.0.attn_norm"], fault["layers.0.attn_norm"])
    # measured 0.027 (correct fp32 offset: 0.020); every tap stays within a few bf16 ulps of the RMS
    assert rel_err(got["layers.0.attn_norm"], ref["layers.0.attn_norm"]) < 0.05
    assert rel_err(got["logits"], ref["logits"]) < 0.15
    if spec.attn_softcap is not None:
        # eager attention (softcap path): bit for bit the port with the offset in bf16, at every tap
        for t in tap_names(spec):
            assert np.array_equal(got[t], fault[t]), t


def test_fused_qkv_matches_litgpts_own_reassembly(lit, case):
    """0.5.x attn.qkv is a plain [Q; K; V] stack, 0.4.x attn.attn is grouped per kv group; litgpt's own
    qkv_reassemble converts between them (grouped -> stacked in 0.5.x, stacked -> grouped in 0.4.x)."""
    import torch

    from parity.adapters.litgpt_style import fuse_qkv as port_grouped

    spec, w, _, _ = case("tiny-gemma")
    stacked = litgpt_pkg.fuse_qkv(w.tensors, spec, "stacked")["model.layers.1.self_attn.qkv.weight"]
    grouped = litgpt_pkg.fuse_qkv(w.tensors, spec, "grouped")["model.layers.1.self_attn.qkv.weight"]
    p = "model.layers.1.self_attn."
    q, k, v = (w.tensors[p + n + "_proj.weight"] for n in "qkv")
    assert np.array_equal(stacked, np.concatenate([q, k, v]))
    assert np.array_equal(grouped, port_grouped(w.tensors, spec)[p + "qkv.weight"])
    assert not np.array_equal(grouped, stacked)  # 2 query heads per kv head: the layouts differ
    # group 0: its two query heads, then its key head, then its value head
    hd = spec.head_dim
    assert np.array_equal(grouped[: 2 * hd], q[: 2 * hd])
    assert np.array_equal(grouped[2 * hd: 3 * hd], k[:hd])
    assert np.array_equal(grouped[3 * hd: 4 * hd], v[:hd])
    layout = lit.build(spec, w, "float32").parity_qkv_layout  # what the installed litgpt uses
    convert = pytest.importorskip("litgpt.scripts.convert_hf_checkpoint")
    config = lit._config(spec)
    source, target = (grouped, stacked) if layout == "stacked" else (stacked, grouped)
    assert np.array_equal(convert.qkv_reassemble(torch.from_numpy(source), config).numpy(), target)


def test_built_model_holds_the_converted_weights(lit, case):
    spec, w, _, _ = case("tiny-gemma2")
    model = lit.build(spec, w, "float32")
    params = dict(model.named_parameters())
    layout = model.parity_qkv_layout
    fused = litgpt_pkg.fuse_qkv(w.tensors, spec, layout)["model.layers.2.self_attn.qkv.weight"]
    assert np.array_equal(params[litgpt_pkg.QKV_TARGET[layout].format(2)].detach().numpy(), fused)
    # Gemma 2 naming: post_attention_layernorm is AFTER attention, pre_feedforward_layernorm before the MLP
    assert np.array_equal(params["transformer.h.0.post_attention_norm.weight"].detach().numpy(),
                          w.tensors["model.layers.0.post_attention_layernorm.weight"])
    assert np.array_equal(params["transformer.h.0.norm_2.weight"].detach().numpy(),
                          w.tensors["model.layers.0.pre_feedforward_layernorm.weight"])
    # tied head: litgpt's lm_head is its own parameter, filled with the embedding
    assert np.array_equal(params["lm_head.weight"].detach().numpy(), w.tensors["model.embed_tokens.weight"])


def test_patched_library_block_shows_in_the_trace(lit, case, monkeypatch):
    """A change patched into litgpt's own code must reach the trace: hooks, not re-computation."""
    import torch.nn.functional as F

    spec, w, tokens, _ = case("tiny-gemma")
    model = lit.build(spec, w, "float32")
    before = lit.run(model, tokens).taps

    def swapped(self, x):  # GELU on the up projection: the geglu-swapped divergence
        return self.proj(self.fc_1(x) * F.gelu(self.fc_2(x), approximate=self.config.gelu_approximate))

    monkeypatch.setattr(litgpt.model.GemmaMLP, "forward", swapped)
    after = lit.run(model, tokens).taps
    assert np.array_equal(before["layers.0.mlp.gate"], after["layers.0.mlp.gate"])
    assert not np.allclose(before["layers.0.mlp.act"], after["layers.0.mlp.act"])
    up = after["layers.0.mlp.up"]
    gelu_up = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up ** 3)))
    np.testing.assert_allclose(after["layers.0.mlp.act"], gelu_up, rtol=1e-5, atol=1e-6)
    assert not np.allclose(before["logits"], after["logits"])

    orig = litgpt.model.Block.forward

    def doubled_residual(self, x, *a, **kw):  # glue between sub-layers changed
        return orig(self, x, *a, **kw) * 2

    monkeypatch.setattr(litgpt.model.Block, "forward", doubled_residual)
    glued = lit.run(model, tokens).taps
    assert np.allclose(glued["layers.0.out"], 2 * after["layers.0.out"])


def test_gelu_wrapper_lives_only_during_run(lit, case):
    import torch.nn.functional as F

    original = F.gelu
    spec, w, tokens, _ = case("tiny-gemma")
    lit.run(lit.build(spec, w, "float32"), tokens)
    assert F.gelu is original and F.softmax.__name__ == "softmax"


def test_mlp_without_a_gelu_call_lists_act_as_unavailable(lit, case, monkeypatch):
    import torch

    spec, w, tokens, _ = case("tiny-gemma")
    model = lit.build(spec, w, "float32")

    def sigmoid_gate(self, x):
        return self.proj(torch.sigmoid(self.fc_1(x)) * self.fc_2(x))

    monkeypatch.setattr(litgpt.model.GemmaMLP, "forward", sigmoid_gate)
    result = lit.run(model, tokens)
    assert "layers.0.mlp.act" not in result.taps
    assert "gelu" in result.unavailable["layers.0.mlp.act"]


def test_isolated_feed_replaces_the_sub_module_input(lit, case):
    spec, w, tokens, ref = case("tiny-gemma")
    model = lit.build(spec, w, "float32")
    plain = lit.run(model, tokens).taps
    fed = lit.run(model, tokens, feed={"layers.2.attn": 2 * ref["layers.2.attn_norm"]}).taps
    assert np.array_equal(fed["layers.2.attn_norm"], plain["layers.2.attn_norm"])  # recorded before the feed
    assert not np.allclose(fed["layers.2.attn"], plain["layers.2.attn"])
    with pytest.raises(ParityInputError, match="cannot feed"):
        lit.run(model, tokens, feed={"embed": ref["embed"]})


def test_config_carries_the_spec_numbers_not_a_preset(lit, case):
    spec = supported(lit, case("tiny-gemma3")[0])
    config = lit._config(spec)
    assert config.norm_eps == spec.norm_eps == 1e-6  # litgpt's Gemma presets leave 1e-5
    assert config.padded_vocab_size == spec.vocab_size
    assert (config.n_query_groups, config.head_size) == (spec.num_kv_heads, spec.head_dim)
    assert config.sliding_window_indices == [1, 1, 1, 1, 1, 0]
    assert config.rope_indices == [1, 1, 1, 1, 1, 0]  # index 1: the local (unscaled) rope table
    assert config.rope_adjustments == {"factor": spec.rope_scaling_factor}


def test_norm_offset_follows_the_spec_through_the_config_name(lit, port, case):
    spec, w, tokens, _ = case("tiny-gemma")
    plain = spec.replace(norm_unit_offset=False)
    model = lit.build(plain, w, "float32")
    assert "Gemma" not in model.config.name
    assert lit.effective(model)["library"]["norm"].startswith("w,")
    assert lit.effective(model)["library"]["norm_offset_rule"] == '"Gemma" in config.name'
    taps = lit.run(model, tokens).taps
    ref = port.run(port.build(plain, w, "float64"), tokens).taps
    assert rel_err(taps["logits"], ref["logits"]) < FP32_REL


def test_low_precision_build_rounds_the_rope_cache(lit, case):
    import torch

    spec, w, _, _ = case("tiny-gemma")
    model = lit.build(spec, w, "bfloat16")
    assert model.cos.dtype == torch.bfloat16  # .to(dtype) casts litgpt's cos/sin buffers
    assert model.transformer.h[0].mlp.fc_1.weight.dtype == torch.bfloat16
    effective = lit.effective(model)
    assert "stored as bfloat16" in effective["library"]["rope_cache"]
    assert effective["library"]["embed_scale"] == "9.8125 in bfloat16" and effective["embed_scale"] == 9.8125


def test_refuses_what_litgpt_cannot_build(lit, case, monkeypatch):
    spec, _, _, _ = case("tiny-gemma")
    with pytest.raises(ParityInputError, match="embed_scale_dtype"):
        lit.check(spec.replace(embed_scale_dtype="float32"), "float32")
    # an older litgpt (0.4.x fields): no Gemma 3, sliding windows only on all or on even layers
    monkeypatch.setattr(litgpt_pkg, "_config_fields", lambda: LITGPT_04_FIELDS)
    with pytest.raises(ParityInputError, match="qk_norm"):
        lit.check(PRESETS["tiny-gemma3"], "float32")
    with pytest.raises(ParityInputError, match="rope_local_base"):
        lit.check(PRESETS["tiny-gemma3"].replace(qk_norm=False), "float32")
    with pytest.raises(ParityInputError, match="rope_scaling_factor"):
        lit.check(spec.replace(rope_scaling_factor=8.0), "float32")
    with pytest.raises(ParityInputError, match="layer_types"):
        lit.check(PRESETS["tiny-gemma2"].replace(layer_types=("global", "local", "global", "local")), "float32")
    lit.check(PRESETS["tiny-gemma2"], "float32")  # even layers local: 0.4.x's "interleaved"


def test_missing_litgpt_is_a_one_line_backend_error(lit, case, monkeypatch):
    spec, _, _, _ = case("tiny-gemma")
    monkeypatch.setitem(sys.modules, "litgpt", None)
    with pytest.raises(BackendMissing, match="pip install litgpt") as e:
        lit.check(spec, "float32")
    assert "\n" not in str(e.value)


def test_too_long_prompt_is_input_error(lit, case):
    spec, w, _, _ = case("tiny-gemma")
    short = spec.replace(max_position=8)
    model = lit.build(short, w, "float32")
    with pytest.raises(ParityInputError, match="max_position"):
        lit.run(model, list(range(3, 12)))
