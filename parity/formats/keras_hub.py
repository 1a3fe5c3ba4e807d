"""keras-hub's Gemma format, both directions, without keras: variable names, tensor layouts, backbone options.

Forwards (spec + canonical weights -> keras-hub) serves the keras adapter's build; backwards (a saved
preset's config.json and variables -> spec + canonical weights) serves `parity.model.checkpoints`. Both read the
same tables, so a preset the adapter would build reads back to the spec and weights it was built from
(tests/test_formats.py).

What keras-hub (0.32) hard-codes, read from its source (keras_hub/src/models/gemma/, gemma3/):

- Which layers are local is fixed by the backbone: GemmaBackbone `i % 2 == 0` (even layers),
  Gemma3Backbone `i % 6 < 5` (five local, one global), when sliding-window attention is on at all.
- RoPE bases: CachedGemmaAttention `RotaryEmbedding(max_wavelength=10_000)` on every layer, no scaling;
  Gemma3Backbone 10_000 on local layers and 1_000_000 on global ones, linear scaling factors by option.
- GemmaBackbone's `intermediate_dim` is the width of BOTH GeGLU halves (2 x HF `intermediate_size`, as
  its HF converter has it); Gemma3Backbone's (`gate_dim_reduction=1`) is one half's.
- The decoder blocks' norms (and Gemma 3's q/k norms) always use eps 1e-6: `layer_norm_epsilon` reaches
  the final norm only.
- Query scaling: 1/sqrt(head_dim) (`query_head_dim_normalize=True`) or 1/sqrt(hidden_dim //
  num_query_heads) (False); nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from parity.model.canonical import canonical_shapes
from parity.errors import ParityInputError
from parity.model.spec import GemmaSpec, gemma_layer_types

# ------------------------------------------------------------------ names
# canonical (HF) name -> keras variable path; `{}` is the layer index. One literal map per norm layout
# (HF's names differ: see weights.canonical_shapes), plus the q/k norms of a qk_norm spec.
NAME_MAP = {  # pre-norm only (Gemma 1)
    "model.embed_tokens.weight": "token_embedding/embeddings",  # also the (tied) output head
    "model.layers.{}.input_layernorm.weight": "decoder_block_{}/pre_attention_norm/scale",
    "model.layers.{}.self_attn.q_proj.weight": "decoder_block_{}/attention/query/kernel",
    "model.layers.{}.self_attn.k_proj.weight": "decoder_block_{}/attention/key/kernel",
    "model.layers.{}.self_attn.v_proj.weight": "decoder_block_{}/attention/value/kernel",
    "model.layers.{}.self_attn.o_proj.weight": "decoder_block_{}/attention/attention_output/kernel",
    "model.layers.{}.post_attention_layernorm.weight": "decoder_block_{}/pre_ffw_norm/scale",  # Gemma 1: pre-MLP
    "model.layers.{}.mlp.gate_proj.weight": "decoder_block_{}/ffw_gating/kernel",  # gelu() is applied to this one
    "model.layers.{}.mlp.up_proj.weight": "decoder_block_{}/ffw_gating_2/kernel",
    "model.layers.{}.mlp.down_proj.weight": "decoder_block_{}/ffw_linear/kernel",
    "model.norm.weight": "final_normalization/scale",
}
NAME_MAP_SANDWICH = {  # pre and post norms around both sub-layers (Gemma 2, 3)
    "model.embed_tokens.weight": "token_embedding/embeddings",
    "model.layers.{}.input_layernorm.weight": "decoder_block_{}/pre_attention_norm/scale",
    "model.layers.{}.self_attn.q_proj.weight": "decoder_block_{}/attention/query/kernel",
    "model.layers.{}.self_attn.k_proj.weight": "decoder_block_{}/attention/key/kernel",
    "model.layers.{}.self_attn.v_proj.weight": "decoder_block_{}/attention/value/kernel",
    "model.layers.{}.self_attn.o_proj.weight": "decoder_block_{}/attention/attention_output/kernel",
    "model.layers.{}.post_attention_layernorm.weight": "decoder_block_{}/post_attention_norm/scale",  # AFTER attn
    "model.layers.{}.pre_feedforward_layernorm.weight": "decoder_block_{}/pre_ffw_norm/scale",
    "model.layers.{}.mlp.gate_proj.weight": "decoder_block_{}/ffw_gating/kernel",
    "model.layers.{}.mlp.up_proj.weight": "decoder_block_{}/ffw_gating_2/kernel",
    "model.layers.{}.mlp.down_proj.weight": "decoder_block_{}/ffw_linear/kernel",
    "model.layers.{}.post_feedforward_layernorm.weight": "decoder_block_{}/post_ffw_norm/scale",
    "model.norm.weight": "final_normalization/scale",
}
QK_NORM_MAP = {  # Gemma 3 (use_query_key_norm): RMSNorm over head_dim, one weight shared by all heads
    "model.layers.{}.self_attn.q_norm.weight": "decoder_block_{}/attention/query_norm/scale",
    "model.layers.{}.self_attn.k_norm.weight": "decoder_block_{}/attention/key_norm/scale",
}


# Gemma 4 (Gemma4Backbone): sandwich norms and q/k norms always, plus the per-layer scalar, per-layer
# embeddings (PLE) and the MoE block where the spec has them. HF's experts.gate_up_proj [E, 2I, D] is two
# keras variables: `#gate` and `#up` name its halves (rows [:I] and [I:]; see `split_names`). KV-shared
# layers have no k/v projections or k norm in either library; K=V global layers have no v_proj.
NAME_MAP_G4 = {**NAME_MAP_SANDWICH, **QK_NORM_MAP,
               "model.layers.{}.layer_scalar": "decoder_block_{}/layer_scalar",  # HF [1] -> keras ()
               "lm_head.weight": None}  # tied: token_embedding(reverse=True) is the head
PLE_MAP = {
    "model.embed_tokens_per_layer.weight": "per_layer_token_embedding/embeddings",
    "model.per_layer_model_projection.weight": "per_layer_model_projection/kernel",
    "model.per_layer_projection_norm.weight": "per_layer_projection_norm/scale",
    "model.layers.{}.per_layer_input_gate.weight": "decoder_block_{}/per_layer_input_gate/kernel",
    "model.layers.{}.per_layer_projection.weight": "decoder_block_{}/per_layer_up_proj/kernel",
    "model.layers.{}.post_per_layer_input_norm.weight": "decoder_block_{}/post_per_layer_input_norm/scale",
}
MOE_MAP = {
    "model.layers.{}.post_feedforward_layernorm_1.weight": "decoder_block_{}/post_ffw_norm_dense/scale",
    "model.layers.{}.pre_feedforward_layernorm_2.weight": "decoder_block_{}/pre_ffw_norm_moe/scale",
    "model.layers.{}.post_feedforward_layernorm_2.weight": "decoder_block_{}/post_ffw_norm_moe_path/scale",
    "model.layers.{}.router.scale": "decoder_block_{}/moe_router/per_dim_scale",
    "model.layers.{}.router.proj.weight": "decoder_block_{}/moe_router/proj/kernel",
    "model.layers.{}.router.per_expert_scale": "decoder_block_{}/moe_expert_bank/per_expert_scale",
    "model.layers.{}.experts.gate_up_proj#gate": "decoder_block_{}/moe_expert_bank/gate_proj",
    "model.layers.{}.experts.gate_up_proj#up": "decoder_block_{}/moe_expert_bank/up_proj",
    "model.layers.{}.experts.down_proj": "decoder_block_{}/moe_expert_bank/down_proj",
}
SPLIT = {"experts.gate_up_proj": ("gate", "up")}  # one canonical tensor, two keras variables


def split_names(name: str) -> list[str]:
    """The keras-side names of one canonical tensor: itself, or `name#part` for each part it splits into."""
    for suffix, parts in SPLIT.items():
        if name.endswith(suffix):
            return [f"{name}#{part}" for part in parts]
    return [name]


def name_map(spec: GemmaSpec) -> dict[str, str]:
    """The literal name map for the spec's norm layout (and q/k norms)."""
    if spec.family == 4:
        return {**NAME_MAP_G4, **(PLE_MAP if _g4(spec, "ple_dim", 0) else {}),
                **(MOE_MAP if _g4(spec, "num_experts", 0) else {})}
    base = NAME_MAP_SANDWICH if spec.norm_placement == "sandwich" else NAME_MAP
    return {**base, **QK_NORM_MAP} if spec.qk_norm else dict(base)


def variable_paths(spec: GemmaSpec) -> dict[str, str]:
    """canonical name -> keras variable path, for every tensor of the spec the map covers."""
    names = name_map(spec)
    out = {}
    for whole in canonical_shapes(spec):
        for canon in split_names(whole):
            m = re.search(r"\.(\d+)\.", canon)
            key = re.sub(r"\.\d+\.", ".{}.", canon, count=1)
            if names.get(key):
                out[canon] = names[key].format(m.group(1)) if m else names[key]
    return out


# ---------------------------------------------------------------- layouts
# The same conversion as keras-hub's own convert_gemma.py / convert_gemma3.py; no head permutation is
# needed because keras-hub rotates half-split like HF (GemmaBackbone permutes q, k only after RoPE;
# Gemma3Backbone not at all). q/k norm weights [head_dim], embeddings [vocab, h] and norm scales [h] are
# as HF stores them; the GeGLU halves of either width convention need nothing more.
_QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
_MLP = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _g4(spec: GemmaSpec, field_: str, default):
    """A Gemma 4 spec field (G4.md names), or its off value on a spec without it."""
    v = getattr(spec, field_, default)
    return default if v is None else v


def layer_dims(spec: GemmaSpec, name: str) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of the layer a canonical tensor belongs to.

    Gemma 4 global layers use global_head_dim, and num_global_kv_heads where K=V is on (HF and keras-hub
    both take the global KV-head count only together with K=V).
    """
    m = re.search(r"layers\.(\d+)\.", name)
    nq, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if spec.family == 4 and m and spec.layer_types and spec.layer_types[int(m.group(1))] == "global":
        hd = _g4(spec, "global_head_dim", hd)
        if _g4(spec, "attention_k_eq_v", False):
            nkv = _g4(spec, "num_global_kv_heads", nkv)
    return nq, nkv, hd


def to_layout(name: str, t: np.ndarray, spec: GemmaSpec) -> np.ndarray:
    """One canonical (HF, torch Linear [out, in]) tensor in keras-hub's layout (a view where it can be).

    `name#part` (see `split_names`) is that part of the canonical tensor `name`.
    """
    if "#" in name:  # experts.gate_up_proj [E, 2I, D]: rows [:I] gate, [I:] up -> [E, D, I]
        whole, part = name.split("#")
        half = t.shape[1] // 2
        return (t[:, :half] if part == "gate" else t[:, half:]).transpose(0, 2, 1)
    if name.endswith("experts.down_proj"):
        return t.transpose(0, 2, 1)  # [E, D, I] -> [E, I, D]
    if name.endswith("layer_scalar"):
        return t.reshape(())  # HF buffer [1] -> keras scalar ()
    if name.endswith(("router.proj.weight", "per_layer_input_gate.weight", "per_layer_projection.weight",
                      "per_layer_model_projection.weight")):
        return t.T  # Dense [out, in] -> [in, out]
    h = spec.hidden_size
    nq, nkv, hd = layer_dims(spec, name)
    if name.endswith(_QKV):
        n = nq if name.endswith("q_proj.weight") else nkv
        return t.reshape(n, hd, h).transpose(0, 2, 1)  # [n*hd, h] -> [n, hd, h] -> EinsumDense "ndh": [n, h, hd]
    if name.endswith("o_proj.weight"):
        return t.T.reshape(nq, hd, h)  # [h, nq*hd] -> [nq*hd, h] -> "nhd": [nq, hd, h]
    if name.endswith(_MLP):
        return t.T  # [out, in] -> "df"/"fd": [in, out]
    return t


def from_layout(name: str, t: np.ndarray, spec: GemmaSpec) -> np.ndarray:
    """The inverse of `to_layout`: a keras-hub tensor back in HF layout; ValueError if the sizes do not fit.

    A `name#part` tensor comes back as its part only ([E, I, D]); `from_keras_layout` joins the parts.
    """
    if "#" in name:
        return t.transpose(0, 2, 1)  # [E, D, I] -> [E, I, D]
    if name.endswith("experts.down_proj"):
        return t.transpose(0, 2, 1)
    if name.endswith("layer_scalar"):
        return t.reshape(1)
    if name.endswith(("router.proj.weight", "per_layer_input_gate.weight", "per_layer_projection.weight",
                      "per_layer_model_projection.weight")):
        return t.T
    h = spec.hidden_size
    nq, nkv, hd = layer_dims(spec, name)
    if name.endswith(_QKV):
        n = nq if name.endswith("q_proj.weight") else nkv
        return t.reshape(n, h, hd).transpose(0, 2, 1).reshape(n * hd, h)  # "ndh" [n, h, hd] -> [n*hd, h]
    if name.endswith("o_proj.weight"):
        return t.reshape(nq * hd, h).T  # "nhd" [nq, hd, h] -> [h, nq*hd]
    if name.endswith(_MLP):
        return t.T  # [in, out] -> [out, in]
    return t


def to_keras_layout(tensors: dict[str, np.ndarray], spec: GemmaSpec) -> dict[str, np.ndarray]:
    """Every canonical tensor in keras-hub's layout (names kept, for `map_weights`)."""
    return {name: np.ascontiguousarray(to_layout(name, t, spec)) for name, t in tensors.items()}


def from_keras_layout(raw: dict[str, np.ndarray], spec: GemmaSpec, where: str) -> dict[str, np.ndarray]:
    """Canonical-named keras-hub tensors back in HF layout; `raw` is emptied as it goes."""
    out = {}
    for name in list(raw):
        t = raw.pop(name)  # one tensor in two layouts at a time, not the whole model
        try:
            t = from_layout(name, t, spec)
        except ValueError:
            raise ParityInputError(f"{where}: keras weight for {name!r} has shape {t.shape}, which does not fit "
                                   "the config's sizes; the preset and its config.json disagree") from None
        out[name] = np.ascontiguousarray(t)
    for name in [n for n in out if n.endswith("#gate")]:  # HF keeps the expert halves in one tensor
        whole = name.split("#")[0]
        out[whole] = np.ascontiguousarray(np.concatenate([out.pop(name), out.pop(whole + "#up")], axis=1))
    return out


# ---------------------------------------------------------------- options
BACKBONES = ("GemmaBackbone", "Gemma3Backbone", "Gemma4Backbone")  # Gemma 1/2, Gemma 3 text, Gemma 4 text
MAX_POSITION = 8192  # keras-hub's Gemma backbones have no position limit; Gemma 1/2's context length
LOCAL_RULE = {1: "i % 2 == 0 (GemmaBackbone)", 2: "i % 2 == 0 (GemmaBackbone)", 3: "i % 6 < 5 (Gemma3Backbone)"}
GEMMA_ROPE = 10_000.0  # CachedGemmaAttention: RotaryEmbedding(max_wavelength=10_000.0), every layer
GEMMA3_ROPE = {"local": 10_000.0, "global": 1_000_000.0}  # Gemma3Backbone, by layer type


def class_names(spec: GemmaSpec) -> tuple[str, str]:
    """The keras-hub backbone and CausalLM classes for the spec's family."""
    if spec.family == 4:
        return "Gemma4Backbone", "Gemma4CausalLM"
    return ("Gemma3Backbone", "Gemma3CausalLM") if spec.family == 3 else ("GemmaBackbone", "GemmaCausalLM")


def local_layers(family: int, num_layers: int, sliding: bool) -> list[bool]:
    """Which layers keras-hub builds local: its backbone's fixed pattern, or none without sliding windows."""
    return [sliding and t == "local" for t in gemma_layer_types(3 if family == 3 else 2, num_layers)]


def query_scalar(spec: GemmaSpec) -> float:
    return spec.query_pre_attn_scalar or spec.head_dim


# keras-hub option -> the spec field it holds unchanged; the sizes are required in a saved config, the
# others have keras-hub defaults there and are read with them
SIZES = {"vocabulary_size": "vocab_size", "num_layers": "num_layers", "num_query_heads": "num_heads",
         "num_key_value_heads": "num_kv_heads", "hidden_dim": "hidden_size", "head_dim": "head_dim"}
SAME = {**SIZES, "attention_logit_soft_cap": "attn_softcap", "final_logit_soft_cap": "final_softcap",
        "layer_norm_epsilon": "norm_eps"}


def backbone_kwargs(spec: GemmaSpec) -> dict:
    """The backbone's keyword arguments: the spec's numbers, in keras-hub's options."""
    if spec.family == 4:
        return gemma4_kwargs(spec)
    sandwich = spec.norm_placement == "sandwich"
    kw = {option: getattr(spec, f) for option, f in SAME.items()}
    kw.update(
        # True: 1/sqrt(head_dim); False: 1/sqrt(hidden_dim // num_query_heads) (27B); what the spec asks
        query_head_dim_normalize=query_scalar(spec) == spec.head_dim,
        use_post_ffw_norm=sandwich,
        use_post_attention_norm=sandwich,
        use_sliding_window_attention="local" in spec.layer_types,
        dropout=0,
    )
    if spec.sliding_window:
        kw["sliding_window_size"] = spec.sliding_window
    if spec.family == 3:
        kw.update(
            intermediate_dim=spec.intermediate_size,  # gate_dim_reduction=1: one projection's width
            image_size=None,  # text only: no vision encoder
            vision_encoder=None,
            use_query_key_norm=spec.qk_norm,
            local_rope_scaling_factor=1.0,
            global_rope_scaling_factor=spec.rope_scaling_factor,
        )
    else:
        kw["intermediate_dim"] = 2 * spec.intermediate_size  # keras-hub: both GeGLU halves together
    return kw


def inexpressible(spec: GemmaSpec) -> Iterator[tuple[str, str]]:
    """(spec field, why) for each number keras-hub has no way to be given; the first one is refused.

    Numbers keras-hub accepts as an option but then builds otherwise (the query
    scaling) are not here: the model is built as asked and the report shows it.
    """
    if spec.family == 4:
        yield from gemma4_inexpressible(spec)
        return
    if not spec.norm_unit_offset:
        yield "norm_unit_offset", "keras-hub's Gemma RMSNormalization always multiplies by (1 + scale)"
    if spec.norm_eps != 1e-6:
        yield "norm_eps", ("the backbones pass layer_norm_epsilon only to the final norm; the decoder-block "
                           "norms (and Gemma 3's q/k norms) always use 1e-6")
    if spec.gelu_approximate != "tanh":
        yield "gelu_approximate", "the decoder blocks hard-code gelu(approximate=True) (tanh)"
    if not spec.embed_scale:
        yield "embed_scale", "the backbones always multiply the embeddings by sqrt(hidden_dim)"
    if spec.embed_scale_dtype != "activation":
        yield "embed_scale_dtype", "the backbones cast sqrt(hidden_dim) to the activation dtype"
    if not spec.tied_head:
        yield "tied_head", "ReversibleEmbedding(tie_weights=True) always ties the output head"
    if spec.family in (1, 2) and spec.qk_norm:
        yield "qk_norm", "GemmaBackbone has no q/k norm (Gemma3Backbone has: family=3)"
    q, hd, per_head = query_scalar(spec), spec.head_dim, spec.hidden_size // spec.num_heads
    if q != hd and q != per_head:
        yield "query_pre_attn_scalar", (
            f"keras-hub's only query scalings are 1/sqrt(head_dim) = 1/sqrt({hd}) "
            f"(query_head_dim_normalize=True) and 1/sqrt(hidden_dim // num_query_heads) = 1/sqrt({per_head}) (False)")
    local = local_layers(spec.family, spec.num_layers, "local" in spec.layer_types)
    if "local" in spec.layer_types and tuple("local" if x else "global" for x in local) != spec.layer_types:
        yield "layer_types", f"keras-hub makes exactly the layers with {LOCAL_RULE[spec.family]} local (or none)"
        return  # the rope checks below assume keras-hub's layer pattern
    yield from _inexpressible_rope(spec, local)


def _inexpressible_rope(spec: GemmaSpec, local: list[bool]) -> Iterator[tuple[str, str]]:
    for i, is_local in enumerate(local):
        base = spec.rope_base_for(i)
        field_ = "rope_local_base" if is_local and spec.rope_local_base is not None else "rope_base"
        if spec.family == 3:
            kind = "local" if is_local else "global"
            if base != GEMMA3_ROPE[kind]:
                yield field_, (f"Gemma3Backbone hard-codes the rope wavelength {GEMMA3_ROPE[kind]:g} on its "
                               f"{kind} layers (layer {i})")
        else:
            if base != GEMMA_ROPE:
                yield field_, "CachedGemmaAttention hard-codes RotaryEmbedding(max_wavelength=10_000)"
            if spec.rope_factor_for(i) != 1.0:
                yield "rope_scaling_factor", "CachedGemmaAttention applies no RoPE scaling"


def spec_from_config(cfg: dict, where: str, name: str) -> GemmaSpec:
    """The spec a saved keras-hub backbone config ({"class_name", "config"}) computes, hard-coded parts included."""
    cls = cfg.get("class_name")
    if cls not in BACKBONES:
        raise ParityInputError(f"{where}: class_name {cls!r} is not one of keras-hub's {BACKBONES}; "
                               "export the model to a HuggingFace directory instead")
    c = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
    if cls == "Gemma4Backbone":
        return gemma4_spec_from_config(c, where, name)

    def refuse(field: str, why: str) -> None:
        raise ParityInputError(f"{where}: {field}={c.get(field)!r} {why}")

    need = ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
            "intermediate_dim", "head_dim")
    missing = [k for k in need if k not in c]
    if missing:
        raise ParityInputError(f"{where}: {cls} config has no {missing[0]!r}; re-save the preset")
    eps = float(c.get("layer_norm_epsilon", 1e-6))
    if eps != 1e-6:
        refuse("layer_norm_epsilon", "reaches only keras-hub's final norm (its decoder blocks use 1e-6), which "
               "one spec cannot express; use 1e-6")
    post_attn, post_ffw = bool(c.get("use_post_attention_norm")), bool(c.get("use_post_ffw_norm"))
    if post_attn != post_ffw:
        refuse("use_post_attention_norm", f"but use_post_ffw_norm={post_ffw}; a spec has pre-norm or sandwich "
               "norms, not one of each")
    kw: dict = {f: int(c[option]) for option, f in SIZES.items()}
    n, heads, hd, hidden = kw["num_layers"], kw["num_heads"], kw["head_dim"], kw["hidden_size"]
    kw.update(name=name, max_position=MAX_POSITION, norm_eps=eps, norm_placement="sandwich" if post_attn else "pre",
              gelu_approximate="tanh", tied_head=True)
    sliding = bool(c.get("use_sliding_window_attention"))
    local = local_layers(3 if cls == "Gemma3Backbone" else 2, n, sliding)
    if cls == "Gemma3Backbone":
        for f, ok in (("vision_encoder", None), ("is_embedding_model", False),
                      ("use_bidirectional_attention", False), ("local_rope_scaling_factor", 1.0)):
            if c.get(f, ok) != ok:
                refuse(f, f"is not the text-only causal Gemma 3 that parity compares (needs {ok!r})")
        kw.update(family=3, intermediate_size=int(c["intermediate_dim"]), qk_norm=bool(c.get("use_query_key_norm",
                  True)), rope_base=GEMMA3_ROPE["global"], rope_scaling_factor=float(c.get(
                  "global_rope_scaling_factor", 1.0)), rope_local_base=GEMMA3_ROPE["local"] if any(local) else None)
    else:
        if c["intermediate_dim"] % 2:
            refuse("intermediate_dim", "is odd; GemmaBackbone splits it into two equal GeGLU halves")
        attn_cap, final_cap = c.get("attention_logit_soft_cap"), c.get("final_logit_soft_cap")
        family = 2 if (post_attn or sliding or attn_cap is not None or final_cap is not None) else 1
        kw.update(family=family, intermediate_size=int(c["intermediate_dim"]) // 2, rope_base=GEMMA_ROPE)
    return GemmaSpec(**kw, **_family_options(kw["family"], c, local, hd, hidden // heads))


def _family_options(family: int, c: dict, local: list[bool], hd: int, per_head: int) -> dict:
    """The query scaling, softcaps and windows of a saved config, as the family's spec fields."""
    scalar = hd if c.get("query_head_dim_normalize", True) else per_head  # what the attention divides by
    if family == 1:
        return {"query_pre_attn_scalar": None if scalar == hd else scalar}
    kw = dict(query_pre_attn_scalar=scalar, attn_softcap=c.get("attention_logit_soft_cap"),
              final_softcap=c.get("final_logit_soft_cap"))
    if any(local):
        kw["layer_types"] = tuple("local" if x else "global" for x in local)
        kw["sliding_window"] = int(c.get("sliding_window_size", 4096))
    return kw


# ---------------------------------------------------------------- Gemma 4
# Gemma4Backbone (keras-hub 0.32, keras_hub/src/models/gemma4/) hard-codes: RMSNorm `x * w` (no unit offset)
# with `layer_norm_epsilon` on every norm; q, k and a scale-less v norm; attention scale 1.0; sandwich
# norms; tanh GELU; a learned scalar on every text block. Its options take the rest. K=V and the global
# KV-head count are one option: `num_global_key_value_heads` set turns on K=V on global layers.
KH_TYPES = {"global": "full_attention", "local": "sliding_attention"}


def kh_rotary_half(prf: float, hd: int) -> int:
    """How many frequencies keras-hub rotates per half (Gemma4TextAttention.rotary_dim // 2)."""
    raw = int(prf * hd)
    return max(2, raw - raw % 2) // 2


def hf_rotary_half(prf: float, hd: int) -> int:
    """How many frequencies HF's proportional RoPE keeps (the rest get inverse frequency 0)."""
    return int(prf * hd // 2)


def gemma4_kwargs(spec: GemmaSpec) -> dict:
    """Gemma4Backbone's keyword arguments for a family-4 spec (text only)."""
    types = spec.layer_types or ("global",) * spec.num_layers
    local = [i for i, t in enumerate(types) if t == "local"]
    glob = [i for i, t in enumerate(types) if t == "global"]
    k_eq_v = bool(_g4(spec, "attention_k_eq_v", False))
    experts = int(_g4(spec, "num_experts", 0))
    kw = {option: getattr(spec, f) for option, f in SAME.items()}
    kw.update(
        image_size=None, vision_encoder=None, audio_encoder=None, dropout=0,
        intermediate_dim=spec.intermediate_size,
        layer_types=[KH_TYPES[t] for t in types],
        use_sliding_window_attention=bool(local),
        global_head_dim=_g4(spec, "global_head_dim", None),
        # keras-hub scales positions by the factor (HF divides the inverse frequencies): the same angles
        global_rope_scaling_factor=spec.rope_scaling_factor, local_rope_scaling_factor=1.0,
        global_rope_wavelength=spec.rope_base_for(glob[0]) if glob else spec.rope_base,
        local_rope_wavelength=spec.rope_base_for(local[0]) if local else spec.rope_base,
        global_rope_partial_rotary_factor=float(_g4(spec, "rope_proportion", 1.0)),
        num_global_key_value_heads=(_g4(spec, "num_global_kv_heads", spec.num_kv_heads) if k_eq_v else None),
        hidden_size_per_layer_input=int(_g4(spec, "ple_dim", 0)),
        vocab_size_per_layer_input=_g4(spec, "ple_vocab_size", None),
        num_kv_shared_layers=int(_g4(spec, "num_kv_shared_layers", 0)),
        use_double_wide_mlp=bool(_g4(spec, "double_wide_mlp", False)),
        enable_moe_block=experts > 0,
    )
    if spec.sliding_window:
        kw["sliding_window_size"] = spec.sliding_window
    if experts:
        kw.update(num_experts=experts, expert_intermediate_dim=int(_g4(spec, "expert_intermediate_size", 0)),
                  num_experts_per_token=int(_g4(spec, "top_k_experts", 0)))
    return kw


def gemma4_spec_from_config(c: dict, where: str, name: str) -> GemmaSpec:
    """The spec a saved Gemma4Backbone config computes (the inverse of `gemma4_kwargs`, text only), with
    what Gemma4Backbone hard-codes (no unit offset, q/k/v norms, scale 1.0, layer scalar) filled in."""
    def refuse(field: str, why: str) -> None:
        raise ParityInputError(f"{where}: {field}={c.get(field)!r} {why}")

    need = ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
            "intermediate_dim", "head_dim", "layer_types")
    missing = [k for k in need if c.get(k) is None]
    if missing:
        raise ParityInputError(f"{where}: Gemma4Backbone config has no {missing[0]!r}; re-save the preset")
    for f, ok in (("vision_encoder", None), ("audio_encoder", None), ("use_bidirectional_attention", False),
                  ("local_rope_scaling_factor", 1.0), ("attention_logit_soft_cap", None)):
        if c.get(f, ok) != ok:
            refuse(f, f"is not the text-only causal Gemma 4 that parity compares (needs {ok!r})")
    back = {v: k for k, v in KH_TYPES.items()}
    if not isinstance(c["layer_types"], list) or any(t not in back for t in c["layer_types"]):
        refuse("layer_types", f"must list one of {sorted(back)} per layer")
    types = tuple(back[t] for t in c["layer_types"])
    k_eq_v = c.get("num_global_key_value_heads") is not None  # keras-hub: the count switches K=V on
    experts = int(c.get("num_experts") or 0) if c.get("enable_moe_block") else 0
    kw: dict = {f: int(c[option]) for option, f in SIZES.items()}
    kw.update(
        family=4, name=name, max_position=MAX_POSITION, norm_eps=float(c.get("layer_norm_epsilon", 1e-6)),
        intermediate_size=int(c["intermediate_dim"]), layer_types=types,
        sliding_window=int(c.get("sliding_window_size", 512)) if "local" in types else None,
        final_softcap=c.get("final_logit_soft_cap"), attn_softcap=None,
        norm_unit_offset=False, norm_placement="sandwich", qk_norm=True, v_norm=True, layer_scalar=True,
        query_pre_attn_scalar=1.0, gelu_approximate="tanh", embed_scale=True, tied_head=True,
        rope_base=float(c.get("global_rope_wavelength", 1_000_000.0)),
        rope_local_base=float(c.get("local_rope_wavelength", 10_000.0)),
        rope_scaling_factor=float(c.get("global_rope_scaling_factor", 1.0)),
        rope_proportion=float(c.get("global_rope_partial_rotary_factor", 1.0)),
        global_head_dim=c.get("global_head_dim"), attention_k_eq_v=k_eq_v,
        num_global_kv_heads=c.get("num_global_key_value_heads") if k_eq_v else None,
        ple_dim=int(c.get("hidden_size_per_layer_input") or 0),
        ple_vocab_size=c.get("vocab_size_per_layer_input") if c.get("hidden_size_per_layer_input") else None,
        num_kv_shared_layers=int(c.get("num_kv_shared_layers") or 0),
        double_wide_mlp=bool(c.get("use_double_wide_mlp", False)),
        num_experts=experts, top_k_experts=int(c.get("num_experts_per_token", 8)) if experts else 0,
        expert_intermediate_size=int(c.get("expert_intermediate_dim") or 0) if experts else 0,
    )
    return GemmaSpec(**kw)


def gemma4_inexpressible(spec: GemmaSpec) -> Iterator[tuple[str, str]]:
    """(spec field, why) for each Gemma 4 number Gemma4Backbone cannot be given."""
    if spec.norm_unit_offset:
        yield "norm_unit_offset", "Gemma4's RMSNormalization multiplies by the weight as is (no 1 + w)"
    if spec.norm_placement != "sandwich":
        yield "norm_placement", "Gemma4TextDecoderBlock always has pre and post norms around both sub-layers"
    if not spec.qk_norm:
        yield "qk_norm", "Gemma4TextAttention always applies q and k norms"
    if not _g4(spec, "v_norm", False):
        yield "v_norm", "Gemma4TextAttention always applies the scale-less v norm"
    if (spec.query_pre_attn_scalar or spec.head_dim) != 1.0:
        yield "query_pre_attn_scalar", "Gemma4TextAttention hard-codes the attention scale 1.0 (query scalar 1)"
    if spec.gelu_approximate != "tanh":
        yield "gelu_approximate", "the decoder blocks hard-code gelu(approximate=True) (tanh)"
    if not spec.embed_scale:
        yield "embed_scale", "Gemma4Backbone always multiplies the embeddings by sqrt(hidden_dim)"
    if spec.embed_scale_dtype != "activation":
        yield "embed_scale_dtype", "Gemma4Backbone casts sqrt(hidden_dim) to the activation dtype"
    if not spec.tied_head:
        yield "tied_head", "ReversibleEmbedding(tie_weights=True) always ties the output head"
    if not _g4(spec, "layer_scalar", False):
        yield "layer_scalar", "every Gemma4 text block multiplies its output by its layer_scalar (give it 1.0 weights)"
    nkv_g = _g4(spec, "num_global_kv_heads", spec.num_kv_heads)
    if not _g4(spec, "attention_k_eq_v", False) and nkv_g != spec.num_kv_heads:
        yield "num_global_kv_heads", ("Gemma4Backbone takes a global KV-head count only with K=V on "
                                      "(num_global_key_value_heads switches both on)")
    types = spec.layer_types or ("global",) * spec.num_layers
    for kind in ("global", "local"):
        bases = {spec.rope_base_for(i) for i, t in enumerate(types) if t == kind}
        if len(bases) > 1:
            yield ("rope_base" if kind == "global" else "rope_local_base"), (
                f"Gemma4Backbone has one rope wavelength for all {kind} layers; the spec gives {sorted(bases)}")
    prf = float(_g4(spec, "rope_proportion", 1.0))
    hd_g = _g4(spec, "global_head_dim", spec.head_dim)
    if "global" in types and prf < 1.0 and kh_rotary_half(prf, hd_g) != hf_rotary_half(prf, hd_g):
        yield "rope_proportion", (f"keras-hub rotates {kh_rotary_half(prf, hd_g)} frequencies per half of a "
                                  f"{hd_g}-dim global head at {prf} (at least 1), HF {hf_rotary_half(prf, hd_g)}")
    if int(_g4(spec, "num_experts", 0)) and not int(_g4(spec, "top_k_experts", 0)):
        yield "top_k_experts", "Gemma4Router needs a positive num_experts_per_token"
