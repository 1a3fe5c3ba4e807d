"""The canonical tensors: HuggingFace names and shapes for a spec (the lingua franca of every adapter)."""

from __future__ import annotations

from parity.model.spec import GemmaSpec


def canonical_shapes(spec: GemmaSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name and its shape, in HF naming for the spec's norm layout."""
    if spec.family == 4:
        return gemma4_shapes(spec)
    h, i, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if spec.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        if spec.norm_placement == "sandwich":
            # Gemma 2/3 naming: post_attention_layernorm is AFTER attention
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        else:
            # Gemma 1 naming: post_attention_layernorm is the PRE-MLP norm
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not spec.tied_head:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def gemma4_shapes(spec: GemmaSpec) -> dict[str, tuple[int, ...]]:
    """Gemma 4's tensors as `Gemma4ForCausalLM(...).state_dict()` names them (transformers 5.25).

    KV-shared layers have no k/v projections or norms; K=V layers no v_proj; v_norm and the MoE router's norm
    have no weight. The layer scalar is a buffer in HF and a weight here (every implementation loads it).
    """
    h, n = spec.hidden_size, spec.num_layers
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    if spec.ple_dim:
        lp = n * spec.ple_dim
        shapes["model.embed_tokens_per_layer.weight"] = (spec.ple_rows, lp)
        shapes["model.per_layer_model_projection.weight"] = (lp, h)
        shapes["model.per_layer_projection_norm.weight"] = (spec.ple_dim,)
    for layer in range(n):
        p = f"model.layers.{layer}."
        hd, kv, i = spec.head_dim_for(layer), spec.kv_heads_for(layer), spec.mlp_width_for(layer)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (spec.num_heads * hd, h)
        if spec.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
        if spec.kv_source(layer) == layer:
            shapes[p + "self_attn.k_proj.weight"] = (kv * hd, h)
            if not spec.k_eq_v_for(layer):
                shapes[p + "self_attn.v_proj.weight"] = (kv * hd, h)
            if spec.qk_norm:
                shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "self_attn.o_proj.weight"] = (h, spec.num_heads * hd)
        for norm in ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            shapes[p + norm + ".weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        if spec.num_experts:
            e, ie = spec.num_experts, spec.expert_intermediate_size
            shapes[p + "router.scale"] = (h,)
            shapes[p + "router.proj.weight"] = (e, h)
            shapes[p + "router.per_expert_scale"] = (e,)
            shapes[p + "experts.gate_up_proj"] = (e, 2 * ie, h)
            shapes[p + "experts.down_proj"] = (e, h, ie)
            for norm in ("post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"):
                shapes[p + norm + ".weight"] = (h,)
        if spec.ple_dim:
            shapes[p + "per_layer_input_gate.weight"] = (spec.ple_dim, h)
            shapes[p + "per_layer_projection.weight"] = (h, spec.ple_dim)
            shapes[p + "post_per_layer_input_norm.weight"] = (h,)
        if spec.layer_scalar:
            shapes[p + "layer_scalar"] = (1,)
    shapes["model.norm.weight"] = (h,)
    if not spec.tied_head:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes
