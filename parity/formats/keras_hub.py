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


def name_map(spec: GemmaSpec) -> dict[str, str]:
    """The literal name map for the spec's norm layout (and q/k norms)."""
    base = NAME_MAP_SANDWICH if spec.norm_placement == "sandwich" else NAME_MAP
    return {**base, **QK_NORM_MAP} if spec.qk_norm else dict(base)


def variable_paths(spec: GemmaSpec) -> dict[str, str]:
    """canonical name -> keras variable path, for every tensor of the spec the map covers."""
    names = name_map(spec)
    out = {}
    for canon in canonical_shapes(spec):
        m = re.search(r"\.(\d+)\.", canon)
        key = re.sub(r"\.\d+\.", ".{}.", canon, count=1)
        if key in names:
            out[canon] = names[key].format(m.group(1)) if m else names[key]
    return out


# ---------------------------------------------------------------- layouts
# The same conversion as keras-hub's own convert_gemma.py / convert_gemma3.py; no head permutation is
# needed because keras-hub rotates half-split like HF (GemmaBackbone permutes q, k only after RoPE;
# Gemma3Backbone not at all). q/k norm weights [head_dim], embeddings [vocab, h] and norm scales [h] are
# as HF stores them; the GeGLU halves of either width convention need nothing more.
_QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
_MLP = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def to_layout(name: str, t: np.ndarray, spec: GemmaSpec) -> np.ndarray:
    """One canonical (HF, torch Linear [out, in]) tensor in keras-hub's layout (a view where it can be)."""
    h, nq, nkv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    if name.endswith(_QKV):
        n = nq if name.endswith("q_proj.weight") else nkv
        return t.reshape(n, hd, h).transpose(0, 2, 1)  # [n*hd, h] -> [n, hd, h] -> EinsumDense "ndh": [n, h, hd]
    if name.endswith("o_proj.weight"):
        return t.T.reshape(nq, hd, h)  # [h, nq*hd] -> [nq*hd, h] -> "nhd": [nq, hd, h]
    if name.endswith(_MLP):
        return t.T  # [out, in] -> "df"/"fd": [in, out]
    return t


def from_layout(name: str, t: np.ndarray, spec: GemmaSpec) -> np.ndarray:
    """The inverse of `to_layout`: a keras-hub tensor back in HF layout; ValueError if the sizes do not fit."""
    h, nq, nkv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
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
    return out


# ---------------------------------------------------------------- options
BACKBONES = ("GemmaBackbone", "Gemma3Backbone")  # Gemma 1/2, and Gemma 3 text
MAX_POSITION = 8192  # keras-hub's Gemma backbones have no position limit; Gemma 1/2's context length
LOCAL_RULE = {1: "i % 2 == 0 (GemmaBackbone)", 2: "i % 2 == 0 (GemmaBackbone)", 3: "i % 6 < 5 (Gemma3Backbone)"}
GEMMA_ROPE = 10_000.0  # CachedGemmaAttention: RotaryEmbedding(max_wavelength=10_000.0), every layer
GEMMA3_ROPE = {"local": 10_000.0, "global": 1_000_000.0}  # Gemma3Backbone, by layer type


def class_names(spec: GemmaSpec) -> tuple[str, str]:
    """The keras-hub backbone and CausalLM classes for the spec's family."""
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
