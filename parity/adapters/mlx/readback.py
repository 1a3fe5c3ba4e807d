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
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math

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

        self.twins = [copy.deepcopy(c) for c in cache]
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
            out[i] = CacheView(pos[keep], _wide(c.keys[0])[:, keep], _wide(c.values[0])[:, keep])
        return out


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


def effective(built) -> dict:
    model, spec = built.model, built.spec
    att = [layer.self_attn for layer in model.model.layers]
    dt = model.model.embed_tokens.weight.dtype
    dname = str(dt).replace("mlx.core.", "")
    rope = [(float(a.rope.base), float(getattr(a.rope, "scale", 1.0))) for a in att]
    gelu = built.observed.get("gelu", "?")
    cache_kinds = _cache_layout(model)
    fused = not hasattr(att[0], "attn_logit_softcapping")
    scale = embed_scale(model, dt)
    types = layer_types(model)
    eff = {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "activation": {"gelu": "exact (nn.gelu)", "gelu_approx": "tanh (nn.gelu_approx)"}.get(gelu, gelu)
        + f" in {dname}",
        "norm": f"(1 + w) formed in {dname} (the weight's dtype), mx.fast.rms_norm, "
        f"eps {sorted({n.eps for layer in model.model.layers for n in _norms(layer)})}",
        "norm_placement": "pre" if spec.family == 1 else "sandwich",
        "embed_scale": f"{scale:.6g} in {dname}",
        "query_scale": _one_or_all([float(a.scale) for a in att]),
        "rope_base": [b for b, _ in rope],
        "rope_scaling": [f"linear {1 / s:g}" if s != 1.0 else "none" for _, s in rope],
        "rope": "mx.fast.rope, half-split" if not getattr(att[0].rope, "traditional", False)
        else "mx.fast.rope, interleaved (traditional)",
        "attention": "mx.fast.scaled_dot_product_attention (fused)" if fused
        else f"q * scale, scores and softcap in {dname}, mask, mx.softmax(precise=True)",
        "attn_softcap": getattr(att[0], "attn_logit_softcapping", None),
        "final_softcap": getattr(model, "final_logit_softcapping", None),
        "layer_types": types,
        "window": windows(model),
        "tied_head": "lm_head" not in model or getattr(model, "tie_word_embeddings", True) is True,
        "kv_cache": cache_kinds,
        "model_args": model_args(model),
        "config_keys_not_read": unread_keys(built.config, model),
    }
    eff["differs_from_spec"] = differences(spec, eff, scale, dt)
    return eff


def differences(spec, eff: dict, scale: float, dt) -> dict:
    """field -> {"spec": ..., "mlx": ...} for every spec value the built model does not compute."""
    import mlx.core as mx

    out = {}

    def differ(name, want, got):
        if want != got:
            out[name] = {"spec": want, "mlx": got}

    n = spec.num_layers
    act = eff["activation"].split(" ")[0]
    differ("gelu_approximate", spec.gelu_approximate, {"exact": "none", "tanh": "tanh"}.get(act, act))
    want_scale = spec.embed_normalizer
    if spec.embed_scale_dtype == "activation":
        want_scale = float(mx.array(want_scale, dtype=dt).astype(mx.float32).item())
    if not math.isclose(scale, want_scale, rel_tol=0, abs_tol=0):
        out["embed_scale"] = {"spec": f"{want_scale:.6g} (sqrt({spec.hidden_size}) in {spec.embed_scale_dtype})",
                              "mlx": f"{scale:.6g}"}
    qs = eff["query_scale"]
    if any(not math.isclose(q, spec.query_scale, rel_tol=1e-6) for q in (qs if isinstance(qs, list) else [qs])):
        out["query_scale"] = {"spec": spec.query_scale, "mlx": qs}
    differ("layer_types", list(spec.layer_types), eff["layer_types"])
    differ("window", [spec.window_for(i) for i in range(n)], eff["window"])
    differ("rope_base", [float(spec.rope_base_for(i)) for i in range(n)], eff["rope_base"])
    differ("rope_scaling", ["none" if spec.rope_factor_for(i) == 1.0 else f"linear {spec.rope_factor_for(i):g}"
                            for i in range(n)], eff["rope_scaling"])
    if spec.family == 2 or eff["attn_softcap"] is not None:
        differ("attn_softcap", spec.attn_softcap, eff["attn_softcap"])
    if spec.family == 2 or eff["final_softcap"] is not None:
        differ("final_softcap", spec.final_softcap, eff["final_softcap"])
    eps = eff["norm"].rsplit("eps ", 1)[-1]
    differ("norm_eps", str([spec.norm_eps]), eps)
    return out


def _norms(layer) -> list:
    names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
             "post_feedforward_layernorm")
    out = [getattr(layer, n) for n in names if n in layer]
    out += [getattr(layer.self_attn, n) for n in ("q_norm", "k_norm") if n in layer.self_attn]
    return out


def _cache_layout(model) -> str:
    """The cache classes make_prompt_cache builds for this model, per layer type as mlx-lm assigns them."""
    from mlx_lm.models.cache import make_prompt_cache

    kinds: dict[str, set] = {}
    for t, c in zip(layer_types(model), make_prompt_cache(model)):
        size = getattr(c, "max_size", None)
        kinds.setdefault(t, set()).add(type(c).__name__ + (f"(max_size={size})" if size is not None else ""))
    return "make_prompt_cache (" + ", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in kinds.items()) + ")"


def _one_or_all(values: list):
    return values[0] if len({repr(v) for v in values}) == 1 else values
