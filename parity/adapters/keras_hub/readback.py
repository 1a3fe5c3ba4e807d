"""What the built keras-hub model computes, read back from its layers and from what a run recorded.

The adapter asks keras-hub for the spec's numbers (parity.formats.keras_hub); this module reads back
what was built (`differences`), describes it for the report (`effective`), says why a tap is missing
(`unavailable`) and reads keras-hub's decode cache (`cache_views`). What the installed keras-hub (0.32)
does, read from its source (keras_hub/src/models/gemma/, gemma3/) and read back here:

Both families
- RMSNormalization computes in float32 whatever the dtype (so a float64 model
  would be downcast there), multiplies by `(1 + scale)` in float32 and casts
  the product to the compute dtype once. Embeddings are scaled by
  `x * ops.cast(ops.sqrt(hidden_dim), x.dtype)`: the normaliser is rounded to
  the activation dtype (9.8125 for sqrt(96) in bf16).
- The decoder blocks are built without the backbone's `layer_norm_epsilon`:
  their norms (and Gemma 3's q/k norms) always use 1e-6; only the final norm
  gets it. A spec with another epsilon is refused.
- The decoder blocks build their attention with `query_head_dim_normalize=True`
  whatever the backbone was given: the option is stored on the block and
  dropped. The adapter asks for what the spec needs (False for
  query_pre_attn_scalar = hidden / heads, as 27B) and the built model scales
  q by 1/sqrt(head_dim) anyway, in the compute dtype, before q.k: the report
  shows it (cause `query-scale`) rather than the adapter refusing it. A
  scalar that is neither head_dim nor hidden // heads has no keras-hub
  option and is refused.
- Attention-logit softcap `tanh(x / cap) * cap` on the scores (after the q
  scaling, in the compute dtype), then the float32 `keras.layers.Softmax`
  (recorded as the `attn.probs` tap, before keras-hub casts it to the compute
  dtype). On GPU keras-hub takes a fused `ops.dot_product_attention` path
  only without a softcap (Gemma 1, Gemma 3), on TPU also with one; then no
  probabilities exist. The final softcap is `ReversibleEmbedding`'s
  `logit_soft_cap`, inside `token_embedding(x, reverse=True)` (the tied
  head), so the `logits` tap includes it, as the CausalLM graph computes it.
- Sliding window: `_mask_sliding_window` keeps key j for query i when
  |i - j| <= window - 1, and'ed with the causal mask: i - j < window, the HF
  definition. Which layers are local is fixed by the backbone (see the format).
- Post norms: `use_post_attention_norm`, `use_post_ffw_norm` (sandwich);
  both classes can also be built pre-norm only.

GemmaBackbone (Gemma 1, 2)
- RoPE: `CachedGemmaAttention` hard-codes `RotaryEmbedding(max_wavelength=10_000)`
  (no scaling, no option). Positions and inverse frequencies are float32,
  cos/sin are cast to the compute dtype. The rotation is half-split (as
  HF/reference), after which q and k are permuted into interleaved order
  ([a0, b0, a1, b1, ...] from halves a, b). Scores are unchanged, so only
  post-RoPE q/k taps (not produced here) and the cached keys need un-permuting.
- No q/k norm (a spec with qk_norm is refused).

Gemma3Backbone (Gemma 3 text)
- RoPE bases are hard-coded per layer (10_000 local, 1_000_000 global);
  `local_rope_scaling_factor` / `global_rope_scaling_factor` are linear
  (inverse frequencies divided by the factor, = HF's positions / factor).
  Half-split, no permutation. Other bases are refused.
- `use_query_key_norm`: an RMSNormalization over head_dim on q and on k
  (`(1 + w)`, float32, eps 1e-6) after the projections and before RoPE.
- In float16 the block clips the residual stream to +-65504.
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from parity.adapters.base import CacheView
from parity.adapters.keras_hub.recording import to_numpy
from parity.formats.keras_hub import query_scalar
from parity.model.spec import GemmaSpec

QK_ROPE_CALLS = ("query_norm", "key_norm", "rope_layer")  # block 0's attention: the order tells where q/k norm is


# ------------------------------------------------------------ the report
def observed(offset: str, gelu: str, geglu: str) -> dict:
    """The properties read off keras-hub by observation (the norm's output on ones, the GELU's on a probe, which
    projection it gates), as effective values: what was not recognised is Unread, saying what was seen."""
    from parity.model.effective import Unread

    return {
        "norm_unit_offset": {"(1 + w)": True, "w": False}.get(offset, Unread(offset)),
        "gelu_approximate": {"tanh": "tanh", "exact": "none"}.get(gelu, Unread(f"not observed ({gelu})")),
        "geglu": {"gelu(gate) * up": "gate", "gelu(up) * gate": "up"}.get(geglu, geglu),
    }


def effective(bb, lm, clean: dict, differences: dict) -> dict:
    """What the model computes, for the report (parity.model.effective's properties plus keras-hub's own
    facts); `clean` is what an unfed run recorded (GELU, call order)."""
    import keras
    from keras import ops

    from parity.model.effective import Unread, report

    blocks = bb.transformer_layers
    att = [b.attention for b in blocks]
    cdt, backend = bb.compute_dtype, keras.config.backend()
    fused_ = fused(bb)
    norm_scale = float(ops.convert_to_numpy(ops.cast(ops.sqrt(bb.hidden_dim), cdt)))
    eps = sorted({n.epsilon for b in blocks for n in block_norms(b)})
    block = type(blocks[0]).__name__
    offset = _norm_offset(blocks[0].pre_attention_norm, cdt)
    placements = {_placement(b) or "mixed" for b in blocks}
    ropes = [a.rope_layer for a in att]
    gelu = clean.get("gelu_kind", "?").split(" ")[0]  # "tanh", "exact", or "tanh by its argument (...)"
    geglu = clean.get("geglu", "?")
    return report({
        "vocab_size": int(bb.vocabulary_size),
        "hidden_size": int(bb.hidden_dim),
        "intermediate_size": int(blocks[0].gating_ffw.kernel.shape[-1]),
        "num_layers": len(blocks),
        "num_heads": int(att[0].num_query_heads),
        "num_kv_heads": int(att[0].num_key_value_heads),
        "head_dim": int(att[0].head_dim),
        **observed(offset, gelu, geglu),
        "norm_placement": placements.pop() if len(placements) == 1 else "mixed",
        "norm_eps": float(blocks[0].pre_attention_norm.epsilon),
        "final_norm": bb.layer_norm is not None,
        "embed_scale": norm_scale,
        "embed_scale_dtype": "activation",  # x * ops.cast(ops.sqrt(hidden_dim), x.dtype), read from the source
        "tied_head": bool(bb.token_embedding.tie_weights),
        "query_scale": [1 / math.sqrt(built_query_scalar(a)) for a in att],
        "rope_base": [float(r.max_wavelength) for r in ropes],
        "rope_scaling_factor": [float(r.scaling_factor) for r in ropes] if all(r.rope_type == "linear" for r in ropes)
        else Unread(f"rope types {[r.rope_type for r in ropes]}"),
        "attn_softcap": [a.logit_soft_cap for a in att],
        "final_softcap": bb.token_embedding.logit_soft_cap,
        "sliding_window": [observed_window(a) for a in att],  # from keras-hub's own sliding mask
        "qk_norm": any(getattr(a, "use_query_key_norm", False) for a in att),
    }, {
        "backend": f"{backend}, compute dtype {cdt}",
        "class": f"{type(bb).__name__} / {type(lm).__name__}",
        "activation": clean.get("gelu_kind", "?") + f" ({clean.get('gelu_args', '?')} in {block}.call; "
        f"{clean.get('gelu_evidence', 'no evidence')}; keras.ops.gelu on {backend} in {cdt})",
        "norm": f"{offset} in float32 (keras-hub casts to float32), cast once after the multiply, eps {eps} in "
        f"blocks, {bb.layer_norm.epsilon} final",
        "norm_placement": _one_or_all([_placement(b) or f"post-attention norm {b.use_post_attention_norm}, "
                                       f"post-FFW norm {b.use_post_ffw_norm}" for b in blocks]),
        "qk_norm": _qk_norm(att, clean["call_order"]),
        "embed_scale": f"sqrt({bb.hidden_dim}) cast to the activation dtype: {norm_scale:.6g} in {cdt}",
        "rope_scaling": [f"{r.rope_type} {float(r.scaling_factor):g}" for r in ropes],
        "rope": f"{rope_layout(att[0])}; angles float32, cos/sin in {ropes[0].compute_dtype}",
        "attention": ("fused ops.dot_product_attention" if fused_ else
                      f"q * scale in {cdt} before q.k, einsum scores, softcap in {cdt}, softmax in float32")
        + ("" if fused_ is not None else " (fused path not determined)"),
        "differs_from_spec": differences,
    })


def _one_or_all(values: list):
    return values[0] if len({repr(v) for v in values}) == 1 else values


def _norm_offset(norm, cdt) -> str:
    """The norm offset, observed: RMSNormalization of an all-ones row is (1 + w) or w."""
    from keras import ops

    w = np.asarray(ops.convert_to_numpy(norm.scale), dtype=np.float64)
    y = np.asarray(ops.convert_to_numpy(norm(ops.ones((1, 1, w.shape[0]), dtype=cdt))), np.float64)[0, 0]
    return "(1 + w)" if np.allclose(y, 1 + w, rtol=2e-2, atol=1e-3) else (
        "w" if np.allclose(y, w, rtol=2e-2, atol=1e-3) else "neither (1 + w) nor w")


def _placement(b) -> str | None:
    """"sandwich" or "pre" for a decoder block; None for one post norm without the other."""
    if b.use_post_attention_norm and b.use_post_ffw_norm:
        return "sandwich"
    return "pre" if not (b.use_post_attention_norm or b.use_post_ffw_norm) else None


def _qk_norm(att: list, order: list[str]) -> str | bool:
    used = [bool(getattr(a, "use_query_key_norm", False)) for a in att]
    if not any(used):
        return False
    qk = [n for a in att for n in (getattr(a, "query_norm", None), getattr(a, "key_norm", None)) if n is not None]
    where = ("before RoPE" if order[:2] in (["query_norm", "rope_layer"], ["key_norm", "rope_layer"])
             else f"call order {order[:4]}")
    return (f"RMSNorm over head_dim on q and k, {where} (block 0), eps {sorted({n.epsilon for n in qk})}"
            + ("" if all(used) else f"; layers {[i for i, u in enumerate(used) if u]} only"))


def gelu_observation(x, y, args, kwargs, original, obs: dict) -> None:
    """Which GELU block 0 evaluated: its resolved arguments, and its numbers against both formulas."""
    approximate = None
    try:
        bound = inspect.signature(original).bind(x, *args, **kwargs)
        bound.apply_defaults()
        approximate = bound.arguments.get("approximate")
        obs["gelu_args"] = f"gelu(approximate={approximate!r})"
    except (TypeError, ValueError):
        obs["gelu_args"] = f"gelu(args={args!r}, kwargs={kwargs!r})"
    xi = np.asarray(to_numpy(x), np.float64).ravel()[:4096]
    yo = np.asarray(to_numpy(y), np.float64).ravel()[:4096]
    tanh = 0.5 * xi * (1 + np.tanh(math.sqrt(2 / math.pi) * (xi + 0.044715 * xi**3)))
    exact = 0.5 * xi * (1 + np.vectorize(math.erf)(xi / math.sqrt(2)))
    et, ee = float(np.abs(yo - tanh).max()), float(np.abs(yo - exact).max())
    obs["gelu_evidence"] = f"output vs tanh-GELU max err {et:.2g}, vs exact {ee:.2g}"
    rt, re_ = float(np.mean((yo - tanh) ** 2)), float(np.mean((yo - exact) ** 2))
    if rt < re_ / 4 or re_ < rt / 4:  # the numbers decide
        obs["gelu_kind"] = "tanh" if rt < re_ else "exact"
    else:  # 16-bit rounding hides the difference: say what the argument asks for
        by_arg = {True: "tanh", False: "exact"}.get(approximate, "?")
        obs["gelu_kind"] = f"{by_arg} by its argument (the two formulas are indistinguishable at this precision)"
    obs["gelu_in"] = to_numpy(x)


def geglu_order(obs: dict, taps: dict) -> None:
    """Which projection the GELU was applied to (block 0, from the recorded numbers), in place of its input."""
    if "gelu_in" not in obs:
        return
    gin = obs.pop("gelu_in")
    gate, up = taps.get("layers.0.mlp.gate"), taps.get("layers.0.mlp.up")
    obs["geglu"] = (
        "gelu(gate) * up" if gate is not None and np.array_equal(gin, gate)
        else "gelu(up) * gate" if up is not None and np.array_equal(gin, up)
        else "gelu input is neither projection's output")


def unavailable(num_layers: int, bb, tap_map: dict, taps: dict, missing: dict) -> dict[str, str]:
    """tap -> why it was not recorded, for the taps of `tap_map` a forward pass (or decode step) lacked."""
    out = {
        f"layers.{i}.attn.scores": (
            "keras-hub's Softmax layer takes the unmasked logits and a boolean mask and adds its large negative "
            "inside the layer: the masked scores never exist as a value")
        for i in range(num_layers)
    }
    for t in tap_map:
        if t in taps:
            continue
        if t.endswith(".attn.probs") and fused(bb):
            why = "keras-hub ran its fused attention op (ops.dot_product_attention): no probabilities exist"
        else:
            why = "not produced during the forward pass; the installed keras-hub's call structure differs"
        out[t] = missing.get(t, why)
    return out


# ------------------------------------------------------------ the built layers
def differences(s: GemmaSpec, bb) -> dict:
    """Read the built layers back: spec field -> {spec, built, why} wherever they differ.

    Not refused: keras-hub accepted the spec's numbers and built something
    else, and the report shows what that does. Known cases carry the reason.
    """
    blocks = bb.transformer_layers
    per_layer: dict[str, tuple[list, list]] = {}
    for i, b in enumerate(blocks):
        for f, want, got in _layer_fields(s, i, b):
            per_layer.setdefault(f, ([], []))
            per_layer[f][0].append(want)
            per_layer[f][1].append(got)
    out = {}
    for f, (want, got) in per_layer.items():
        if want != got:
            same = len(set(map(repr, want))) == 1 and len(set(map(repr, got))) == 1
            out[f] = {"spec": want[0] if same else want, "built": got[0] if same else got}
    for f, want, got in (("norm_eps", s.norm_eps, bb.layer_norm.epsilon),
                         ("final_softcap", s.final_softcap, bb.token_embedding.logit_soft_cap),
                         ("tied_head", s.tied_head, bool(bb.token_embedding.tie_weights))):
        if want != got and f not in out:
            out[f] = {"spec": want, "built": got}
    if "query_pre_attn_scalar" in out and any(
            not b.query_head_dim_normalize and b.attention.query_head_dim_normalize for b in blocks):
        out["query_pre_attn_scalar"]["why"] = (
            f"{type(blocks[0]).__name__} was given query_head_dim_normalize=False but builds its attention with "
            "query_head_dim_normalize=True: q is scaled by 1/sqrt(head_dim)")
    return out


def _layer_fields(s: GemmaSpec, i: int, b) -> list[tuple[str, object, object]]:
    """(spec field, what the spec asks of layer i, what decoder block b does)."""
    a = b.attention
    eps = {n.epsilon for n in block_norms(b)}
    eps |= {n.epsilon for n in (getattr(a, "query_norm", None), getattr(a, "key_norm", None)) if n is not None}
    rope = a.rope_layer
    return [
        ("query_pre_attn_scalar", query_scalar(s), built_query_scalar(a)),
        ("rope_base", s.rope_base_for(i), float(rope.max_wavelength)),
        ("rope_scaling_factor", s.rope_factor_for(i),
         float(rope.scaling_factor) if rope.rope_type == "linear" else rope.rope_type),
        ("attn_softcap", s.attn_softcap, a.logit_soft_cap),
        ("sliding_window", s.window_for(i), observed_window(a)),
        ("qk_norm", s.qk_norm, bool(getattr(a, "use_query_key_norm", False))),
        ("norm_placement", s.norm_placement, _placement(b) or "mixed"),
        ("norm_eps", s.norm_eps, sorted(eps)[0] if len(eps) == 1 else sorted(eps)),
    ]


def block_norms(b) -> list:
    """A decoder block's RMSNormalization layers: the pre norms and whichever post norms it has."""
    names = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
    return [n for n in (getattr(b, name, None) for name in names) if n is not None]


def built_query_scalar(a) -> int:
    """What the attention layer divides by (its own flag, not the block's or the backbone's)."""
    return a.head_dim if a.query_head_dim_normalize else a.hidden_dim // a.num_query_heads


def observed_window(a) -> int | None:
    """The window keras-hub's own sliding mask gives: 1 + the largest i - j it keeps (None: not local)."""
    if not a.use_sliding_window_attention:
        return None
    from keras import ops

    w = int(a.sliding_window_size)
    T = w + 2  # long enough to see both an allowed and a cut key
    try:
        m = np.asarray(ops.convert_to_numpy(a._mask_sliding_window(ops.ones((1, T, T), "bool"))))[0]
    except Exception:  # a private helper; other versions may differ: fall back to the declared size
        return w
    i, j = np.nonzero(np.tril(m))
    d = i - j
    kept = set(d.tolist())
    widest = int(d.max())
    if kept != set(range(widest + 1)):  # not a band: say so rather than guess a number
        return -1
    return widest + 1


def fused(bb) -> bool | None:
    """Whether keras-hub's attention takes its fused path here (GPU/TPU with a fused op); None: unknown."""
    try:
        return bool(bb.transformer_layers[0].attention._use_fused_attention_op())
    except Exception:  # a private helper; other versions may lack it
        return None


# ------------------------------------------------------------ RoPE layout
def _rope_probe(a):
    """(x, the RotaryEmbedding of x, the attention's _apply_rope of x or None) for a random x [1, 3, 1, hd]."""
    from keras import ops

    hd = int(a.head_dim)
    x = np.random.default_rng(0).standard_normal((1, 3, 1, hd)).astype(np.float32)
    xt = ops.convert_to_tensor(x, dtype=a.rope_layer.compute_dtype)
    rotated = np.asarray(ops.convert_to_numpy(a.rope_layer(xt, start_index=0)), np.float32)
    try:
        applied = np.asarray(ops.convert_to_numpy(a._apply_rope(xt, 0)), np.float32)
    except Exception:  # a private helper
        applied = None
    return x, rotated, applied


def _interleaved(x: np.ndarray) -> np.ndarray:
    """[a0, b0, a1, b1, ...] from the halves a, b of the last axis (GemmaBackbone's post-RoPE layout)."""
    return np.stack(np.split(x, 2, axis=-1), axis=-1).reshape(x.shape)


def permuted_after_rope(a) -> bool | None:
    """Whether the attention layer permutes rotated q/k into interleaved order; None: cannot tell."""
    _, rotated, applied = _rope_probe(a)
    if applied is None:
        return None
    if np.array_equal(applied, rotated):
        return False
    return True if np.array_equal(applied, _interleaved(rotated)) else None


def rope_layout(a) -> str:
    """Half-split or interleaved, and whether q/k are permuted after the rotation, read off the layer."""
    x, rotated, applied = _rope_probe(a)
    hd = int(a.head_dim)
    if applied is None:
        return "half-split (RotaryEmbedding); post-rotation layout not determined"
    # half-split rotation at position 1: x1' = x1 cos - x2 sin (first half from both halves)
    half = hd // 2
    inv = 1.0 / float(a.rope_layer.max_wavelength) ** (np.arange(half) * 2 / hd)
    if a.rope_layer.rope_type == "linear":
        inv = inv / float(a.rope_layer.scaling_factor)
    c, s_ = np.cos(inv), np.sin(inv)
    x1, x2 = x[0, 1, 0, :half], x[0, 1, 0, half:]
    want = np.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_])
    split = "half-split" if np.allclose(rotated[0, 1, 0], want, atol=2e-2) else "not half-split"
    if np.array_equal(applied, rotated):
        return f"{split} (RotaryEmbedding), q/k not permuted"
    if np.array_equal(applied, _interleaved(rotated)):
        return f"{split} (RotaryEmbedding), then q/k permuted to interleaved order (scores unchanged)"
    return f"{split} (RotaryEmbedding), then q/k changed in an unrecognised way"


# ------------------------------------------------------------ the decode cache
def cache_views(cache, num_layers: int, dtype: str, p: int, permuted: list) -> dict[int, CacheView]:
    """Each layer's cache after writing position p: positions 0..p, keys in the half-split layout."""
    views = {}
    for i, (k, v) in enumerate(_layer_kv(cache, num_layers, dtype)):
        k, v = k[:p + 1].transpose(1, 0, 2), v[:p + 1].transpose(1, 0, 2)  # [kv, p + 1, hd]
        if permuted[i]:
            k = np.concatenate([k[..., 0::2], k[..., 1::2]], axis=-1)
        views[i] = CacheView(np.arange(p + 1), np.ascontiguousarray(k), v.copy())
    return views


def _layer_kv(cache, num_layers: int, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each layer's (keys, values) [slots, kv, head_dim] from keras-hub's cache, batch dropped.

    GemmaCausalLM stacks every layer into one [batch, layers, 2, slots, kv, hd] tensor; Gemma3CausalLM
    keeps a tuple of per-layer (key, value) tensors [batch, slots, kv, hd].
    """
    from keras import ops

    out = np.float64 if dtype == "float64" else np.float32  # bf16/fp16 -> fp32 is exact

    def arr(t) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(t)).astype(out)[0]

    if isinstance(cache, (tuple, list)):
        if len(cache) != num_layers:
            raise RuntimeError(f"keras-hub's cache has {len(cache)} entries for {num_layers} layers")
        return [(arr(k), arr(v)) for k, v in cache]
    whole = arr(cache)  # [layers, 2, slots, kv, hd]
    if whole.ndim != 5 or whole.shape[:2] != (num_layers, 2):
        raise RuntimeError(f"keras-hub's cache has shape {whole.shape}, not [layers, 2, slots, kv, head_dim]")
    return [(whole[i, 0], whole[i, 1]) for i in range(num_layers)]
