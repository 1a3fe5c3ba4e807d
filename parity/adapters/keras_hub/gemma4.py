"""keras-hub's Gemma 4 (Gemma4Backbone + Gemma4CausalLM, text only): its taps, and what its layers compute.

What the installed keras-hub (0.32, keras_hub/src/models/gemma4/) does, read from its source and read
back here rather than assumed:

- The decoder block runs its dense MLP as `ops.matmul(x, self.gating_ffw.kernel)` (and `gating_ffw_2`,
  `ffw_linear`), not as layer calls ("HOTFIX ... graph tracer bugs"): `mlp.gate`, `mlp.up`, `mlp.hidden`
  and `mlp` are recorded from keras.ops.matmul, recognised by the kernel variable it is given, and
  `mlp.act` from the keras.activations.gelu call whose input is the gate's output (the PLE gate and the
  experts call GELU too, on other inputs).
- `pre_scalar` is the block's local `x` at the moment it casts its `layer_scalar` (the last op of the
  block, `x * ops.cast(self.layer_scalar, x.dtype)`): read from the block's frame, the value keras-hub
  multiplies, not recomputed.
- The MoE router (Gemma4Router) flattens tokens ([T, H]); its `proj` output is `moe.router_logits`; the
  probabilities it gives `ops.top_k` (softmax in float32, cast back to the compute dtype BEFORE the top-k)
  are `moe.router_probs`, and top_k's indices `moe.experts`. The router returns the dense dispatch
  matrix [T, E] (renormalised weights at the chosen experts, 0 elsewhere): `moe.weights` is read from
  it at the chosen ids. keras-hub applies `per_expert_scale` to the expert outputs, not to the weights.
- The per-layer input is the block's `per_layer_input` keyword argument (computed in the backbone's graph
  from the PLE table and projection); the PLE branch is `post_per_layer_input_norm`'s output.
- KV sharing: `kv_shared_layer_index` on each shared block (the backbone's `_kv_source`, the last
  non-shared layer of the same type); the shared block reads that layer's K/V of the same call.
- Decode: one stacked cache [B, L, 2, T_max, num_key_value_heads, max(head_dim, global_head_dim)]; a global
  layer writes and reads a [.., :kv_heads, :global_head_dim] corner; shared layers keep their own slot
  unchanged (zeros) and read the source's slot of this step.
"""

from __future__ import annotations

import sys

import numpy as np

from parity.adapters.keras_hub.recording import COS, GELU, REVERSE, Hook, fed
from parity.model.spec import GemmaSpec

# canonical tap -> (keras layer path, side); see recording.Recorder for the sides. Taps recorded by hooks
# (mlp.gate, mlp.up, mlp.act, mlp.hidden, mlp, pre_scalar, moe.router_probs, moe.experts, moe.weights)
# point at the pseudo-path of the function they come from, for the messages.
MATMUL, CAST, TOP_K = "ops.matmul", "ops.cast", "ops.top_k"
TAP_MAP = {
    "embed": ("decoder_block_0", "in"),  # x * cast(sqrt(hidden), x.dtype), done in the backbone's graph
    "rope.cos": ("decoder_block_0/attention/.rope_layer" + COS, "out"),
    "layers.{}.per_layer_input": ("decoder_block_{}", "kw:per_layer_input"),
    "layers.{}.attn_norm": ("decoder_block_{}/pre_attention_norm", "out"),
    "layers.{}.attn.probs": ("decoder_block_{}/attention/.softmax", "out"),
    "layers.{}.attn": ("decoder_block_{}/attention", "out"),
    "layers.{}.post_attn_norm": ("decoder_block_{}/post_attention_norm", "out"),
    "layers.{}.attn_residual": ("decoder_block_{}/pre_ffw_norm", "in"),
    "layers.{}.mlp_norm": ("decoder_block_{}/pre_ffw_norm", "out"),
    "layers.{}.mlp.gate": ("decoder_block_{}/" + MATMUL, "out"),
    "layers.{}.mlp.up": ("decoder_block_{}/" + MATMUL, "out"),
    "layers.{}.mlp.act": ("decoder_block_{}/" + GELU, "out"),
    "layers.{}.mlp.hidden": ("decoder_block_{}/" + MATMUL, "in"),
    "layers.{}.mlp": ("decoder_block_{}/" + MATMUL, "out"),
    "layers.{}.dense_branch": ("decoder_block_{}/post_ffw_norm_dense", "out"),
    "layers.{}.moe.router_logits": ("decoder_block_{}/moe_router/proj", "out+flat"),
    "layers.{}.moe.router_probs": ("decoder_block_{}/" + TOP_K, "in+flat"),
    "layers.{}.moe.experts": ("decoder_block_{}/" + TOP_K, "out+flat"),
    "layers.{}.moe.weights": ("decoder_block_{}/moe_router", "out+flat"),  # read at moe.experts
    "layers.{}.moe_branch": ("decoder_block_{}/post_ffw_norm_moe_path", "out"),
    "layers.{}.post_mlp_norm": ("decoder_block_{}/post_ffw_norm", "out"),
    "layers.{}.ple": ("decoder_block_{}/post_per_layer_input_norm", "out"),
    "layers.{}.pre_scalar": ("decoder_block_{}/" + CAST, "in"),
    "layers.{}.out": ("decoder_block_{}", "out"),
    "final_norm": ("final_normalization", "out"),
    "logits": ("token_embedding" + REVERSE, "out"),  # includes the final softcap (ReversibleEmbedding's)
}
HOOKED = ("mlp.gate", "mlp.up", "mlp.act", "mlp.hidden", "mlp", "moe.router_probs", "moe.experts",
          "pre_scalar")
DISPATCH = "layers.{}.moe.dispatch"  # the router's output, [T, E]: moe.weights is read from it

# Isolated mode: the sub-layers Gemma 4 calls as layers (the MLP is fed through its matmuls, `MLP_FEED`).
FEED_MAP = {
    "layers.{}.attn_norm": ("decoder_block_{}/pre_attention_norm",),
    "layers.{}.attn": ("decoder_block_{}/attention",),
    "layers.{}.post_attn_norm": ("decoder_block_{}/post_attention_norm",),
    "layers.{}.mlp_norm": ("decoder_block_{}/pre_ffw_norm",),
    "layers.{}.mlp": ("decoder_block_{}/" + MATMUL,),
    "layers.{}.post_mlp_norm": ("decoder_block_{}/post_ffw_norm",),  # dense specs only: see `feedable`
    "layers.{}.out": ("decoder_block_{}",),
    "final_norm": ("final_normalization",),
    "logits": ("token_embedding" + REVERSE,),
}


def feedable(spec: GemmaSpec, feed: dict) -> dict:
    """The feed without the taps whose input is not one reference tap on this spec.

    With MoE the post-FFW norm's input is dense + experts, which no tap holds (the harness's isolated feed
    gives it the dense `mlp` tap): not fed, the norm runs on keras-hub's own sum of its fed branches.
    """
    if not getattr(spec, "num_experts", 0):
        return feed
    return {t: v for t, v in feed.items() if not t.endswith(".post_mlp_norm")}


def recorder_map(tap_map: dict) -> dict:
    """The tap map the recorder installs: moe.weights becomes the router's whole output (DISPATCH)."""
    out = {}
    for tap, (path, side) in tap_map.items():
        if tap.endswith(".moe.weights"):
            i = tap.split(".")[1]
            out[DISPATCH.format(i)] = (path, side)
        out[tap] = (path, side)
    return out


def hooks(blocks: list, observe_gelu) -> list[Hook]:
    """The inline functions Gemma 4's blocks call, wrapped to record the taps they compute."""
    import keras
    from keras import ops

    def matmul(rec, i, original, args, kwargs):
        b = blocks[i]
        kernel = args[1] if len(args) > 1 else kwargs.get("x2")
        which = ("gate" if kernel is b.gating_ffw.kernel else "up" if kernel is b.gating_ffw_2.kernel
                 else "down" if kernel is b.ffw_linear.kernel else None)
        if which is None:
            return original(*args, **kwargs)
        value = rec.feeds.get(f"decoder_block_{i}/{MATMUL}")
        if value is not None and which in ("gate", "up"):
            args = (fed(value, args[0]), *args[1:])
        if which == "down":
            rec.put(f"layers.{i}.mlp.hidden", args[0])
        y = original(*args, **kwargs)
        rec.put(f"layers.{i}." + {"gate": "mlp.gate", "up": "mlp.up", "down": "mlp"}[which], y)
        if which == "gate":
            rec.state.setdefault(i, {})["gate"] = y
        return y

    def gelu(rec, i, original, args, kwargs):
        y = original(*args, **kwargs)
        if args and args[0] is rec.state.get(i, {}).get("gate"):
            rec.put(f"layers.{i}.mlp.act", y)
            rec.state[i]["gelu_calls"] = rec.state[i].get("gelu_calls", 0) + 1
            if i == 0 and rec.state[i]["gelu_calls"] == 1 and observe_gelu is not None:
                observe_gelu(args[0], y, args[1:], kwargs, original)
        return y

    def top_k(rec, i, original, args, kwargs):
        y = original(*args, **kwargs)
        rec.put(f"layers.{i}.moe.router_probs", args[0], flat=True)
        rec.put(f"layers.{i}.moe.experts", y[1], flat=True)
        return y

    def cast(rec, i, original, args, kwargs):
        if args and args[0] is getattr(blocks[i], "layer_scalar", None):
            x = _block_local(blocks[i], "x")
            if x is None:
                rec.missing[f"layers.{i}.pre_scalar"] = (
                    f"decoder block {i} cast its layer_scalar, but no frame of its call holds a local `x` "
                    "(this keras-hub's Gemma4TextDecoderBlock.call is structured differently)")
            else:
                rec.put(f"layers.{i}.pre_scalar", x)
        return original(*args, **kwargs)

    why = "this keras version has no {} to wrap".format
    return [
        Hook(ops, "matmul", matmul, MATMUL,
             tuple(f"layers.{{}}.{t}" for t in ("mlp.gate", "mlp.up", "mlp.hidden", "mlp")), why("keras.ops.matmul")),
        Hook(getattr(keras, "activations", None), "gelu", gelu, GELU, ("layers.{}.mlp.act",),
             why("keras.activations.gelu")),
        Hook(ops, "top_k", top_k, TOP_K, ("layers.{}.moe.router_probs", "layers.{}.moe.experts"),
             why("keras.ops.top_k")),
        Hook(ops, "cast", cast, CAST, ("layers.{}.pre_scalar",), why("keras.ops.cast")),
    ]


def _block_local(block, name: str):
    """The local `name` of the innermost frame running `block`'s call (self is block), or None."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_locals.get("self") is block and name in frame.f_locals:
            return frame.f_locals[name]
        frame = frame.f_back
    return None


def finish(taps: dict, num_layers: int, missing: dict) -> None:
    """After a run: moe.weights read from the router's dispatch matrix at the chosen experts (same order)."""
    for i in range(num_layers):
        dispatch = taps.pop(DISPATCH.format(i), None)
        experts = taps.get(f"layers.{i}.moe.experts")
        if dispatch is None:
            continue
        if experts is None:
            taps.pop(f"layers.{i}.moe.weights", None)
            missing[f"layers.{i}.moe.weights"] = "keras.ops.top_k was not seen in the router: no chosen experts"
            continue
        taps[f"layers.{i}.moe.weights"] = np.take_along_axis(dispatch, experts.astype(np.int64), axis=-1)


def pseudo_missing(tap_map: dict, taps: dict, missing: dict) -> None:
    """Taps a hook should have recorded but did not: say which function was never called as expected."""
    for tap, (path, _side) in tap_map.items():
        if tap in taps or tap in missing:
            continue
        fn = path.rsplit("/", 1)[-1]
        if fn == MATMUL:
            missing[tap] = ("keras.ops.matmul was not called with this block's MLP kernel "
                            "(gating_ffw/gating_ffw_2/ffw_linear.kernel) in this keras-hub version")
        elif fn == GELU:
            missing[tap] = "keras.activations.gelu was not called on the MLP gate's output in this block"
        elif fn == TOP_K:
            missing[tap] = "keras.ops.top_k was not called while this block's router ran"
        elif fn == CAST:
            missing[tap] = "the block never cast its layer_scalar (keras.ops.cast) in this keras-hub version"


# ------------------------------------------------------------ what was built
def kv_source(backbone) -> dict[str, int]:
    """Shared layer -> the layer whose K/V it reads, as keras-hub's blocks were built (`_kv_source`)."""
    return {str(i): int(b.kv_shared_layer_index) for i, b in enumerate(backbone.transformer_layers)
            if getattr(b, "is_kv_shared_layer", False) and b.kv_shared_layer_index is not None}


def settings(backbone) -> dict:
    """The Gemma 4 options as the built backbone holds them (so a dropped setting shows)."""
    bb = backbone
    blocks = bb.transformer_layers
    att = [b.attention for b in blocks]
    return {
        "layer_types": list(bb.layer_types),
        "head_dim": [int(a.head_dim) for a in att],
        "kv_heads": [int(a.effective_num_kv_heads) for a in att],
        "k_eq_v": [bool(a.attention_k_eq_v) for a in att],
        "rotary_dims": [int(a.rotary_dim) for a in att],
        "rope_wavelength": [float(a.rope_layer.max_wavelength) for a in att],
        "rope_scaling_factor": [float(a.rope_layer.scaling_factor) for a in att],
        "sliding_window": [int(a.sliding_window_size) if b.use_sliding_window_attention and not b.is_global_attention
                           else None for a, b in zip(att, blocks)],
        "layer_norm_epsilon": float(bb.layer_norm_epsilon),
        "hidden_size_per_layer_input": int(bb.hidden_size_per_layer_input),
        "vocab_size_per_layer_input": (int(bb.per_layer_token_embedding.input_dim)
                                       if bb.hidden_size_per_layer_input else None),
        "num_kv_shared_layers": int(bb.num_kv_shared_layers),
        "kv_source": kv_source(bb),
        "mlp_width": [int(b.actual_intermediate_dim) for b in blocks],
        "num_experts": int(bb.num_experts or 0) if bb.enable_moe_block else 0,
        "top_k_experts": (int(blocks[0].moe_router.num_experts_per_token) if bb.enable_moe_block else 0),
        "expert_intermediate_dim": int(bb.expert_intermediate_dim or 0) if bb.enable_moe_block else 0,
        "final_logit_soft_cap": bb.token_embedding.logit_soft_cap,
        "attention_logit_soft_cap": _one([a.logit_soft_cap for a in att]),
    }


def _one(values: list):
    return values[0] if len({repr(v) for v in values}) == 1 else values


def wanted(spec: GemmaSpec) -> dict:
    """What the spec asks of each setting in `settings`, in the same shape."""
    from parity.formats.keras_hub import KH_TYPES, _g4, kh_rotary_half

    types = spec.layer_types or ("global",) * spec.num_layers
    glob = [t == "global" for t in types]
    hd_g = _g4(spec, "global_head_dim", spec.head_dim)
    k_eq_v = bool(_g4(spec, "attention_k_eq_v", False))
    nkv_g = _g4(spec, "num_global_kv_heads", spec.num_kv_heads) if k_eq_v else spec.num_kv_heads
    prf = float(_g4(spec, "rope_proportion", 1.0))
    n_shared = int(_g4(spec, "num_kv_shared_layers", 0))
    first_shared = spec.num_layers - n_shared
    experts = int(_g4(spec, "num_experts", 0))
    ple = int(_g4(spec, "ple_dim", 0))
    return {
        "layer_types": [KH_TYPES[t] for t in types],
        "head_dim": [hd_g if g else spec.head_dim for g in glob],
        "kv_heads": [nkv_g if g else spec.num_kv_heads for g in glob],
        "k_eq_v": [k_eq_v and g for g in glob],
        "rotary_dims": [2 * kh_rotary_half(prf, hd_g) if g and prf < 1.0 else (hd_g if g else spec.head_dim)
                        for g in glob],
        "rope_wavelength": [float(spec.rope_base_for(i)) for i in range(spec.num_layers)],
        "rope_scaling_factor": [float(spec.rope_factor_for(i)) for i in range(spec.num_layers)],
        "sliding_window": [spec.window_for(i) for i in range(spec.num_layers)],
        "layer_norm_epsilon": float(spec.norm_eps),
        "hidden_size_per_layer_input": ple,
        "vocab_size_per_layer_input": (int(_g4(spec, "ple_vocab_size", spec.vocab_size)) if ple else None),
        "num_kv_shared_layers": n_shared,
        "kv_source": {str(j): max(k for k in range(first_shared) if types[k] == types[j])
                      for j in range(first_shared, spec.num_layers)} if n_shared else {},
        "mlp_width": [spec.intermediate_size * (2 if _g4(spec, "double_wide_mlp", False) and i >= first_shared
                                                else 1) for i in range(spec.num_layers)],
        "num_experts": experts,
        "top_k_experts": int(_g4(spec, "top_k_experts", 0)) if experts else 0,
        "expert_intermediate_dim": int(_g4(spec, "expert_intermediate_size", 0)) if experts else 0,
        "final_logit_soft_cap": spec.final_softcap,
        "attention_logit_soft_cap": spec.attn_softcap,
    }


def differences(spec: GemmaSpec, backbone) -> dict:
    """spec setting -> {spec, built} wherever the built Gemma 4 layers differ from what the spec asks."""
    built, want = settings(backbone), wanted(spec)
    return {k: {"spec": want[k], "built": built[k]} for k in want if want[k] != built[k]}


def effective(spec: GemmaSpec, backbone, lm, clean: dict, diffs: dict) -> dict:
    """What the built Gemma 4 computes: parity.model.effective's properties read back from the layers, the
    Gemma 4 settings as built under `library`, and the kv sources at the top level (G4.md)."""
    import math

    import keras
    from keras import ops

    from parity.adapters.keras_hub import readback
    from parity.model.effective import Unread, report

    bb, blocks = backbone, backbone.transformer_layers
    att = [b.attention for b in blocks]
    cdt = bb.compute_dtype
    norm_scale = float(ops.convert_to_numpy(ops.cast(ops.sqrt(bb.hidden_dim), cdt)))
    offset = readback._norm_offset(blocks[0].pre_attention_norm, cdt)
    gelu = clean.get("gelu_kind", "?").split(" ")[0]
    geglu = clean.get("geglu", "?")
    local = [i for i, b in enumerate(blocks) if not b.is_global_attention]
    out = report({
        "vocab_size": int(bb.vocabulary_size),
        "hidden_size": int(bb.hidden_dim),
        "intermediate_size": int(blocks[0].gating_ffw.kernel.shape[-1]),
        "num_layers": len(blocks),
        "num_heads": int(att[0].num_query_heads),
        "num_kv_heads": int(att[local[0]].effective_num_kv_heads if local else att[0].num_key_value_heads),
        "head_dim": int(att[local[0]].head_dim if local else bb.head_dim),
        **readback.observed(offset, gelu, geglu),
        "norm_placement": "sandwich",  # Gemma4TextDecoderBlock: always both post norms (no option)
        "norm_eps": float(blocks[0].pre_attention_norm.epsilon),
        "final_norm": bb.layer_norm is not None,
        "embed_scale": norm_scale,
        "embed_scale_dtype": "activation",  # x * ops.cast(ops.sqrt(hidden_dim), x.dtype), read from the source
        "tied_head": bool(bb.token_embedding.tie_weights),
        "query_scale": [1.0] * len(att),  # Gemma4TextAttention: query_normalization = 1.0, hard-coded
        "rope_base": [float(a.rope_layer.max_wavelength) for a in att],
        "rope_scaling_factor": [float(a.rope_layer.scaling_factor) for a in att],
        "attn_softcap": [a.logit_soft_cap for a in att],
        "final_softcap": bb.token_embedding.logit_soft_cap,
        "sliding_window": [readback.observed_window(a) for a in att],
        "qk_norm": all(a.query_norm is not None for a in att),
    }, {
        "backend": f"{keras.config.backend()}, compute dtype {cdt}",
        "class": f"{type(bb).__name__} / {type(lm).__name__}",
        "activation": clean.get("gelu_kind", "?") + f" ({clean.get('gelu_args', '?')}; "
        f"{clean.get('gelu_evidence', 'no evidence')})",
        "norm": f"{offset} in float32, cast once after the multiply, eps {bb.layer_norm_epsilon} on every norm",
        "qk_norm": f"q and k RMSNorm over head_dim, v scale-less; block 0 call order {clean.get('call_order', [])[:3]}",
        "attention": ("fused ops.dot_product_attention" if readback.fused(bb) else
                      "einsum scores, scale 1.0, softmax in float32 cast to the compute dtype"),
        "router": ("float32 softmax cast to the compute dtype BEFORE ops.top_k; renormalised in the compute "
                   "dtype; per_expert_scale on the expert outputs" if bb.enable_moe_block else "no MoE"),
        "gemma4": settings(bb),
        "differs_from_spec": diffs,
    })
    out["kv_source"] = kv_source(bb)
    return out


# ------------------------------------------------------------ decode cache
def cache_views(cache, backbone, dtype: str, p: int) -> dict:
    """Each layer's K/V after writing position p, positions 0..p: a layer's own corner of the stacked cache
    ([:kv_heads, :head_dim]); a shared layer shows its source's slot of this step (what it read)."""
    from parity.adapters.keras_hub.readback import cache_views as plain

    blocks = backbone.transformer_layers
    views = plain(cache, len(blocks), dtype, p, [False] * len(blocks))
    out = {}
    for i, b in enumerate(blocks):
        a = b.attention
        src = b.kv_shared_layer_index if getattr(b, "is_kv_shared_layer", False) else i
        v = views[src]
        kv, hd = int(a.effective_num_kv_heads), int(a.head_dim)
        out[i] = type(v)(v.positions, np.ascontiguousarray(v.k[:kv, :, :hd]), np.ascontiguousarray(v.v[:kv, :, :hd]))
    return out


def rope_is_half_split(a) -> bool:
    """Whether the attention's own _apply_rope is HF's (proportional) half-split RoPE, probed at positions 0..2."""
    from keras import ops

    hd, half = int(a.head_dim), int(a.rotary_dim) // 2
    x = np.random.default_rng(0).standard_normal((1, 3, 1, hd)).astype(np.float32)
    try:
        y = np.asarray(ops.convert_to_numpy(a._apply_rope(ops.convert_to_tensor(x), 0)), np.float64)[0, :, 0]
    except Exception:  # a private helper
        return False
    j = np.arange(hd // 2)
    inv = np.where(j < half, float(a.rope_layer.max_wavelength) ** (-2.0 * j / hd), 0.0)
    inv = inv / float(a.rope_layer.scaling_factor)
    ang = np.arange(3)[:, None] * inv[None]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[0, :, 0, :hd // 2].astype(np.float64), x[0, :, 0, hd // 2:].astype(np.float64)
    want = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return bool(np.allclose(y, want, atol=1e-4))
