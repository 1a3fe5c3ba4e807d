"""What the loaded mlx-lm model computes, read back from it, and the positions its caches hold.

What mlx-lm 0.32.2 does, read from its source (mlx_lm/models/gemma.py, gemma2.py, gemma3_text.py) and read
back here from the built model:

- ModelArgs keeps only the config keys its dataclass declares (`BaseModelArgs.from_dict`); every other key
  of config.json is dropped without a word. Gemma 1's ModelArgs has no activation key, Gemma 2's no
  `sliding_window` or `layer_types`, Gemma 3's no `layer_types` (it derives them from
  `sliding_window_pattern`, default 6).
- Gemma 1's MLP calls `nn.gelu` (exact, erf), whatever `hidden_act` says; Gemma 2/3 call `nn.gelu_approx`.
- RMSNorm is `mx.fast.rms_norm(x, 1.0 + self.weight, eps)`: the `(1 + w)` sum is formed in the weight's
  dtype (bf16/fp16 in a 16-bit checkpoint), the normalisation inside the kernel.
- Embedding scale: Gemma 1/2 multiply by the Python float sqrt(hidden) (MLX casts a scalar to the array's
  dtype); Gemma 3 multiplies by `mx.array(sqrt(hidden), mx.bfloat16).astype(h.dtype)`: rounded to bf16 in
  every dtype, float32 included.
- Gemma 2 has no sliding window: one causal mask and a KVCache for every layer. Its attention computes
  the scores inline (q scaled first, softcap in the model dtype) and `mx.softmax(precise=True)`.
- Gemma 1/3 attention is `mx.fast.scaled_dot_product_attention`; Gemma 3 local layers get a sliding mask
  and a RotatingKVCache(max_size=window); its float16 residual adds are clipped to +-65504 in float32.
- RoPE is `nn.RoPE` (mx.fast.rope); Gemma 3 global layers `initialize_rope(..., scaling_config=rope_scaling)`
  (linear: scale = 1 / factor), local layers the local base without scaling.
- Gemma 4 (gemma4_text.py; taps in gemma4.py): norms are `nn.RMSNorm` (w as is), the embedding scale the
  Python float sqrt(hidden); global layers use `ProportionalRoPE`, whose periods (inf past the rotated share)
  are read back as frequencies; `library` adds per-layer head sizes, KV heads, K=V, MLP widths, PLE and expert
  sizes and the KV-shared layers' sources, as built (`previous_kvs`) and as observed (`kv_source`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import numpy as np

# config.json keys that carry no numerics of the model (ids, bookkeeping, parity's own block)
_INERT = {"architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
          "attention_dropout", "parity", "torch_dtype", "dtype", "transformers_version", "use_cache",
          "initializer_range", "tie_word_embeddings"}


# ------------------------------------------------------------ caches
class PositionShadow:
    """The absolute position each slot of mlx-lm's caches holds, kept by mlx-lm's own cache code.

    Each cache object gets a twin of its class (copied while empty); whenever the model calls the real
    cache's `update_and_fetch` with S new keys at offset o, the twin receives S one-element entries holding
    o + 1 .. o + S. The twin trims, rotates and reorders exactly as the real cache does, so its slot j holds
    (position + 1) of the real slot j; 0 is a slot not written yet.
    """

    def __init__(self, cache: list) -> None:
        import mlx.core as mx

        from mlx_lm.models.cache import KVCache, QuantizedKVCache

        # a quantized cache's twin is a float one with the same slots (positions must not be rounded)
        self.twins = [KVCache() if isinstance(c, QuantizedKVCache) else copy.deepcopy(c) for c in cache]
        for c, twin in zip(cache, self.twins):
            update = c.update_and_fetch

            def recorded(keys, values, c=c, twin=twin, update=update):
                o, s = c.offset, keys.shape[2]
                pos = mx.arange(o + 1, o + s + 1, dtype=mx.float32).reshape(1, 1, s, 1)
                twin.update_and_fetch(pos, pos)
                return update(keys, values)

            c.update_and_fetch = recorded  # an instance attribute: no class is patched

    def views(self, cache: list) -> dict:
        from parity.adapters.base import CacheView

        out = {}
        for i, (c, twin) in enumerate(zip(cache, self.twins)):
            pos = np.array(twin.keys[0, 0, :, 0]).astype(np.int64) - 1
            keep = pos >= 0
            k, v = (_dequantized(c, x) for x in (c.keys, c.values))
            out[i] = CacheView(pos[keep], _wide(k[0])[:, keep], _wide(v[0])[:, keep])
        return out


def _dequantized(cache, x):
    """A QuantizedKVCache's (packed, scales, biases) as the values its attention reads (mx.dequantize)."""
    import mlx.core as mx

    if not isinstance(x, tuple):
        return x
    return mx.dequantize(*x, group_size=cache.group_size, bits=cache.bits)


def _wide(x) -> np.ndarray:
    import mlx.core as mx

    return np.array(x.astype(mx.float32 if x.dtype != mx.float64 else x.dtype))


# ------------------------------------------------------------ the report
def model_args(model) -> dict:
    """mlx-lm's ModelArgs as loaded, every field."""
    return {f.name: getattr(model.args, f.name) for f in dataclasses.fields(model.args)}


def unread_keys(config: dict, model) -> list[str]:
    """config.json keys ModelArgs has no field for (dropped by from_dict), numerics only."""
    fields = set(inspect.signature(type(model.args)).parameters)
    return sorted(k for k in config if k not in fields and k not in _INERT)


def layer_types(model) -> list[str]:
    out = []
    for layer in model.model.layers:
        out.append("local" if getattr(layer.self_attn, "is_sliding", False) else "global")
    return out


def windows(model) -> list:
    """The window each layer's mask applies: Gemma 3's sliding layers the model's window_size, else none."""
    w = getattr(model.model, "window_size", None)
    return [w if t == "local" else None for t in layer_types(model)]


def embed_scale(model, dtype) -> float:
    """The factor the model's forward multiplies the embeddings by in this dtype, computed as the installed
    source writes it (a bf16 constant where the forward says mx.bfloat16, else the Python float cast to the
    array's dtype, as MLX casts a scalar operand)."""
    import mlx.core as mx

    hidden = model.args.hidden_size
    src = inspect.getsource(type(model.model).__call__)
    if "mx.bfloat16" in src:
        return float(mx.array(hidden**0.5, mx.bfloat16).astype(dtype).astype(mx.float32).item())
    return float(mx.array(hidden**0.5, dtype=dtype).astype(mx.float32).item())


def effective(built, probe: dict) -> dict:
    """parity.model.effective's typed properties read back from the loaded model, plus mlx-lm's own facts
    under `library` (ModelArgs as loaded, the config keys it dropped, caches). `probe` is what a one-token
    recorded forward showed: the GELU function the MLP called (`gelu`) and which projection it took
    (`geglu`)."""
    import mlx.core as mx
    import mlx.nn as nn

    from parity.model.effective import GELU_PROBE, gelu_kind, report

    model, spec = built.model, built.spec
    layers = model.model.layers
    layer0, att = layers[0], [layer.self_attn for layer in layers]
    emb = model.model.embed_tokens.weight
    dt = emb.dtype
    dname = str(dt).replace("mlx.core.", "")
    gelu = probe.get("gelu")
    if "gelu_values" in probe:  # Gemma 4: the compiled geglu's own output on the probe (adapter._probe_gemma4)
        act = gelu_kind(probe["gelu_values"])
    else:
        act = (gelu_kind(np.array(getattr(nn, gelu)(mx.array(GELU_PROBE, mx.float32))).tolist()) if gelu
               else "?")
    rope = [_rope(a.rope) for a in att]
    scale = embed_scale(model, dt)
    bf16_scale = "mx.bfloat16" in inspect.getsource(type(model.model).__call__)
    return report({
        "vocab_size": int(emb.shape[0]),
        "hidden_size": int(emb.shape[1]),
        "intermediate_size": int(layer0.mlp.gate_proj.weight.shape[0]),
        "num_layers": len(layers),
        "num_heads": int(att[0].n_heads),
        "num_kv_heads": int(att[0].n_kv_heads),
        "head_dim": int(att[0].head_dim),
        "norm_unit_offset": _norm_offset(layer0.input_layernorm),
        "norm_placement": "sandwich" if "post_feedforward_layernorm" in layer0 else "pre",
        "norm_eps": float(layer0.input_layernorm.eps),
        "final_norm": "norm" in model.model,
        "gelu_approximate": act,
        "geglu": probe.get("geglu", "?"),
        "embed_scale": scale,
        "embed_scale_dtype": "bfloat16" if bf16_scale and dt != mx.bfloat16 else "activation",
        "tied_head": "lm_head" not in model,
        "query_scale": [float(a.scale) for a in att],
        "rope_base": [b for b, _ in rope],
        "rope_scaling_factor": [f for _, f in rope],
        "attn_softcap": [None if getattr(a, "attn_logit_softcapping", None) is None
                         else float(a.attn_logit_softcapping) for a in att],
        "final_softcap": None if getattr(model, "final_logit_softcapping", None) is None
        else float(model.final_logit_softcapping),
        "sliding_window": windows(model),
        "qk_norm": "q_norm" in att[0],
    }, {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "gelu": (gelu if "gelu_values" in probe else f"nn.{gelu}") + f" in {dname}" if gelu else "not observed",
        "norm": f"mx.fast.rms_norm(x, 1.0 + w): (1 + w) formed in {dname} (the weight's dtype)",
        "embed_scale": f"{scale:.6g} in {dname}" + (" (a bfloat16 constant)" if bf16_scale else ""),
        "rope": _rope_text(att),
        "attention": "mx.fast.scaled_dot_product_attention (fused)" if not hasattr(att[0], "attn_logit_softcapping")
        else f"q * scale, scores and softcap in {dname}, mask, mx.softmax(precise=True)",
        "layer_types": layer_types(model),
        "kv_cache": _cache_layout(model),
        "model_args": model_args(model),
        "config_keys_not_read": unread_keys(built.config, model),
        **(_gemma4(built) if spec.family == 4 else {}),
    })


def _rope(rope) -> tuple[float, float]:
    """(base, linear factor) of a layer's RoPE module: nn.RoPE's base and scale, or the periods mlx-lm's
    ProportionalRoPE hands mx.fast.rope (factor * base^(2j/d), inf past the rotated share) as frequencies."""
    from parity.model.effective import rope_from_inv_freq

    freqs = getattr(rope, "_freqs", None)
    if freqs is not None:
        return rope_from_inv_freq((1.0 / np.array(freqs, np.float64)).tolist())
    return float(rope.base), 1.0 / float(getattr(rope, "scale", 1.0))


def _rope_text(att) -> str:
    kinds = []
    for a in att:
        name = type(a.rope).__name__
        text = ("nn.RoPE (mx.fast.rope)" if name == "RoPE" else
                f"{name} (mx.fast.rope with periods; {int(np.isfinite(np.array(a.rope._freqs)).sum())} of "
                f"{a.head_dim // 2} frequencies rotate)" if hasattr(a.rope, "_freqs") else name)
        if text not in kinds:
            kinds.append(text)
    return "; ".join(kinds) + (", interleaved" if getattr(att[0].rope, "traditional", False) else ", half-split")


def _gemma4(built) -> dict:
    """Gemma 4's own structure as mlx-lm built it: head sizes and KV heads per layer, which layers have their
    own K/V (and K=V), MLP widths, per-layer input width, experts, and which layer each shared one reads."""
    model = built.model
    layers = model.model.layers
    att = [layer.self_attn for layer in layers]
    m = model.model
    return {
        "head_dim_per_layer": [int(a.head_dim) for a in att],
        "kv_heads_per_layer": [int(a.n_kv_heads) for a in att],
        "own_kv": [bool(a.has_kv) for a in att],
        "k_eq_v": [bool(a.use_k_eq_v) for a in att],
        "mlp_width_per_layer": [int(layer.mlp.gate_proj.weight.shape[0]) for layer in layers],
        "ple_dim": int(m.hidden_size_per_layer_input or 0),
        "ple_vocab_size": int(m.embed_tokens_per_layer.weight.shape[0]) if m.embed_tokens_per_layer is not None
        else None,
        "experts": ({"num_experts": int(layers[0].router.proj.weight.shape[0]),
                     "top_k": int(model.args.top_k_experts),
                     "expert_width": int(layers[0].experts.switch_glu.gate_proj.weight.shape[1])}
                    if layers[0].enable_moe else None),
        "kv_source_rule": {str(i): j for i, j in enumerate(m.previous_kvs) if i != j},
        "kv_source": built.kv_source,
    }


def _norm_offset(norm) -> bool:
    """Whether the norm multiplies by (1 + w): its output on a row of ones (RMS 1) is the factor itself."""
    import mlx.core as mx

    w = np.array(norm.weight.astype(mx.float32), np.float64)
    y = np.array(norm(mx.ones((1, w.shape[0]), norm.weight.dtype)).astype(mx.float32), np.float64)[0]
    return bool(np.allclose(y, 1 + w, rtol=2e-2, atol=1e-3))


def _cache_layout(model) -> str:
    """The cache classes make_prompt_cache builds for this model, per layer type as mlx-lm assigns them."""
    from mlx_lm.models.cache import make_prompt_cache

    kinds: dict[str, set] = {}
    for t, c in zip(layer_types(model), make_prompt_cache(model)):
        size = getattr(c, "max_size", None)
        kinds.setdefault(t, set()).add(type(c).__name__ + (f"(max_size={size})" if size is not None else ""))
    return "make_prompt_cache (" + ", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in kinds.items()) + ")"
