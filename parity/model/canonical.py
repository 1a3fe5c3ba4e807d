"""The canonical tensors: HuggingFace names and shapes for a spec (the lingua franca of every adapter)."""

from __future__ import annotations

from parity.model.spec import GemmaSpec


def canonical_shapes(spec: GemmaSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name and its shape, in HF naming for the spec's norm layout."""
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
