"""Gemma 4 specs: config.json both ways (text and multimodal, released and transformers-5.25 spellings),
contradictions refused naming their fields, canonical names as HF's state_dict gives them, seeded weights."""

import numpy as np
import pytest

from parity.errors import ParityInputError
from parity.model.canonical import canonical_shapes
from parity.model.gemma4_config import to_gemma4_multimodal_config
from parity.model.presets import PRESETS
from parity.model.spec import GEMMA4_FIELDS, from_hf_config, to_hf_config, truncate
from parity.model.taps import tap_names
from parity.model.weights import random_weights

GEMMA4 = [n for n, s in PRESETS.items() if s.family == 4]
TINY = ["tiny-gemma4", "tiny-gemma4-moe"]


def _hf_text_config(spec):
    import transformers

    cfg = {k: v for k, v in to_hf_config(spec).items() if k not in ("model_type", "parity", "architectures")}
    return transformers.Gemma4TextConfig(**cfg)


def test_presets_exist_and_gemma_1_to_3_are_unchanged():
    assert {"tiny-gemma4", "tiny-gemma4-moe", "gemma-4-e2b", "gemma-4-e4b", "gemma-4-26b-a4b",
            "gemma-4-31b"} <= set(GEMMA4)
    for name, s in PRESETS.items():
        if s.family < 4:
            assert all(getattr(s, f) == off for f, off in GEMMA4_FIELDS.items()), name
            assert "model_type" in to_hf_config(s) and "global_head_dim" not in to_hf_config(s)


@pytest.mark.parametrize("name", GEMMA4)
def test_multimodal_config_round_trip(name):
    spec = PRESETS[name]
    cfg = to_gemma4_multimodal_config(spec)
    assert cfg["model_type"] == "gemma4" and "text_config" in cfg
    assert from_hf_config(cfg) == spec


@pytest.mark.parametrize("name", GEMMA4)
def test_transformers_config_round_trip(name):
    """HF config -> spec -> HF config: transformers 5.25 writes per_layer_config, parity writes global_head_dim;
    both read to the same spec, and the config parity writes builds the same HF config again."""
    import transformers

    spec = PRESETS[name]
    first = _hf_text_config(spec).to_dict()
    assert "per_layer_config" in first  # the 5.25 spelling, not the one parity writes
    again = from_hf_config(first).replace(name=spec.name)
    assert again == spec
    second = _hf_text_config(again).to_dict()
    drop = {"_name_or_path", "architectures", "transformers_version"}
    assert {k: v for k, v in first.items() if k not in drop} == {k: v for k, v in second.items() if k not in drop}
    # the multimodal wrapper HF writes reads to the same text spec
    mm = transformers.Gemma4Config(text_config=first).to_dict()
    assert from_hf_config(mm).replace(name=spec.name) == spec


def test_released_config_reads_to_the_preset():
    """The released spelling (global_head_dim, num_global_key_value_heads), as google/gemma-4-31B's text_config."""
    text = {"model_type": "gemma4_text", "vocab_size": 262144, "hidden_size": 5376, "intermediate_size": 21504,
            "num_hidden_layers": 60, "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 256,
            "global_head_dim": 512, "num_global_key_value_heads": 4, "attention_k_eq_v": True,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
            "sliding_window": 1024, "final_logit_softcapping": 30.0, "hidden_size_per_layer_input": 0,
            "num_kv_shared_layers": 0, "enable_moe_block": False, "use_double_wide_mlp": False,
            "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 10,
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                   "rope_theta": 1000000.0}}}
    cfg = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": text}
    assert from_hf_config(cfg).replace(name="gemma-4-31b") == PRESETS["gemma-4-31b"]
    # without K=V, HF ignores num_global_key_value_heads, and so does the spec
    s = from_hf_config({**text, "attention_k_eq_v": False})
    assert s.num_global_kv_heads is None and s.kv_heads_for(5) == 16


@pytest.mark.parametrize("changes,needle", [
    ({"top_k_experts": 9}, "top_k_experts=9 is outside 1..num_experts=8"),
    ({"num_experts": 0}, "top_k_experts=2 is set but num_experts=0"),
    ({"expert_intermediate_size": 0}, "expert_intermediate_size=0"),
    ({"num_kv_shared_layers": 6}, "num_kv_shared_layers=6 >= num_layers=6"),
    ({"num_kv_shared_layers": 4}, "shared 'global' layer but no 'global' layer before layer 2"),
    ({"rope_proportion": 0.0}, "rope_proportion=0.0 is outside (0, 1]"),
    ({"rope_proportion": 1.5}, "rope_proportion=1.5 is outside (0, 1]"),
    ({"ple_dim": 0, "ple_vocab_size": 256}, "ple_vocab_size=256 is set but ple_dim=0"),
    ({"ple_vocab_size": 1024}, "ple_vocab_size=1024 exceeds vocab_size=512"),
    ({"attention_k_eq_v": False}, "num_global_kv_heads=1 is set but attention_k_eq_v is false"),
    ({"num_global_kv_heads": 3}, "num_heads=4 is not a multiple of num_global_kv_heads=3"),
    ({"global_head_dim": 33}, "global_head_dim=33 is odd"),
    ({"num_kv_shared_layers": 0}, "double_wide_mlp is set but num_kv_shared_layers=0"),
    ({"v_norm": 1}, "v_norm=1 is not a boolean"),
])
def test_contradictions_are_refused_naming_the_fields(changes, needle):
    base = PRESETS["tiny-gemma4-moe"] if "expert" in str(changes) or "global_kv" in str(changes) \
        or "k_eq_v" in str(changes) else PRESETS["tiny-gemma4"]
    if "num_experts" in changes or "top_k_experts" in changes:
        base = PRESETS["tiny-gemma4-moe"]
    with pytest.raises(ParityInputError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        base.replace(**changes)


def test_gemma4_fields_refused_on_older_families():
    with pytest.raises(ParityInputError, match="family=3 has no ple_dim"):
        PRESETS["tiny-gemma3"].replace(ple_dim=16)


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.update(layer_types=["sliding_attention"] * 6), "text_config.layer_types"),
    (lambda t: t.update(rope_parameters={"rope_theta": 1e6}), "text_config.rope_parameters.rope_theta"),
    (lambda t: t.update(per_layer_config={"2": {"head_dim": 64}, "4": {"head_dim": 32}}), "per_layer_config"),
    (lambda t: t.update(use_bidirectional_attention="all"), "use_bidirectional_attention"),
    (lambda t: t.update(enable_moe_block=True, num_experts=4, top_k_experts=5, moe_intermediate_size=8),
     "top_k_experts=5"),
])
def test_bad_config_json_is_refused(edit, needle):
    cfg = to_gemma4_multimodal_config(PRESETS["tiny-gemma4"])
    cfg["text_config"].pop("global_head_dim") if "per_layer_config" in needle else None
    edit(cfg["text_config"])
    with pytest.raises(ParityInputError, match=needle):
        from_hf_config(cfg)


@pytest.mark.parametrize("name", TINY)
def test_hf_builds_the_preset_with_the_canonical_names(name):
    import transformers

    spec = PRESETS[name]
    model = transformers.Gemma4ForCausalLM(_hf_text_config(spec))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert got == canonical_shapes(spec)


def test_kv_sources_and_widths():
    s = PRESETS["tiny-gemma4"]
    assert [s.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 2, 3]
    assert [s.mlp_width_for(i) for i in range(6)] == [128] * 4 + [256] * 2
    assert [s.head_dim_for(i) for i in range(6)] == [32, 32, 32, 64, 32, 64]
    e2b = PRESETS["gemma-4-e2b"]
    assert (e2b.kv_source(34), e2b.kv_source(33)) == (14, 13)
    e4b = PRESETS["gemma-4-e4b"]
    assert (e4b.kv_source(41), e4b.kv_source(40)) == (23, 22)
    moe = PRESETS["tiny-gemma4-moe"]
    assert [moe.kv_heads_for(i) for i in range(6)] == [2, 2, 1, 2, 2, 1] and moe.k_eq_v_for(2)
    t = truncate(e2b, 6)
    assert t.num_kv_shared_layers == 0 and not t.double_wide_mlp


def test_taps_name_the_new_points_in_forward_order():
    names = tap_names(PRESETS["tiny-gemma4"])
    i = names.index("layers.4.per_layer_input")
    assert names[i:i + 2] == ["layers.4.per_layer_input", "layers.4.attn_norm"]
    assert names[names.index("layers.4.post_mlp_norm"):names.index("layers.4.out") + 1] == [
        "layers.4.post_mlp_norm", "layers.4.ple", "layers.4.pre_scalar", "layers.4.out"]
    moe = tap_names(PRESETS["tiny-gemma4-moe"])
    a = moe.index("layers.0.mlp")
    assert moe[a + 1:a + 8] == ["layers.0.dense_branch", "layers.0.moe.router_logits", "layers.0.moe.router_probs",
                                "layers.0.moe.experts", "layers.0.moe.weights", "layers.0.moe_branch",
                                "layers.0.post_mlp_norm"]
    assert not any("moe" in t or "ple" in t or "scalar" in t for t in tap_names(PRESETS["tiny-gemma3"]))


def test_random_weights_sit_around_one_where_gemma4_multiplies_as_is():
    w = random_weights(PRESETS["tiny-gemma4-moe"], seed=0).tensors
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.router.scale",
                 "model.layers.0.router.per_expert_scale", "model.layers.0.layer_scalar"):
        d = np.abs(w[name] - 1)
        assert d.min() >= 0.09 and d.max() <= 0.61, name  # near 1, never at it (a dropped factor shows)
    assert w["model.layers.0.experts.gate_up_proj"].std() == pytest.approx(96 ** -0.5, rel=0.1)
    ple = random_weights(PRESETS["tiny-gemma4"], seed=0).tensors["model.embed_tokens_per_layer.weight"]
    assert ple.std() * 16 ** 0.5 == pytest.approx(1.0, rel=0.05)
