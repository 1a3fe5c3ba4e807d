"""Gemma 4 specs from and to HuggingFace config.json: `Gemma4TextConfig` ("gemma4_text") and the text part of a
multimodal `Gemma4Config` ("gemma4", numerics under "text_config").

Read with the installed transformers' keys and defaults (transformers 5.25 `configuration_gemma4.py`), so a file
missing a key gives the model HF would build from it. Two spellings of the global-layer shapes exist:
the released config.json files carry `global_head_dim` / `num_global_key_value_heads`, and transformers 5.25
writes a `per_layer_config` (per full-attention layer index: head_dim, num_key_value_heads) instead; both are read,
the first is written (HF 5.25 accepts it as a keyword). HF applies `num_global_key_value_heads` only where
`attention_k_eq_v` is on, and so does this reader.
"""

from __future__ import annotations

from pathlib import Path

from parity.model.config_checks import MAX_LAYERS, ConfigReader

# parity.model.spec imports this module (it dispatches family 4 here), so this one takes nothing from it:
# it reads a config into the spec's keyword arguments and writes one from any object with the spec's fields
HF_LAYER_TYPES = ("full_attention", "sliding_attention")
NORM_PLACEMENTS = ("pre", "sandwich")
SCALE_DTYPES = ("activation", "float32")

TEXT_MODEL_TYPE, MULTIMODAL_MODEL_TYPE = "gemma4_text", "gemma4"
# what HF's Gemma 4 hard-codes; a spec asking otherwise keeps its choice under "parity" (HF ignores that key)
HARD_CODED = {"norm_placement": "sandwich", "norm_unit_offset": False, "embed_scale": True,
              "embed_scale_dtype": "activation", "qk_norm": True, "v_norm": True, "layer_scalar": True,
              "query_pre_attn_scalar": 1.0, "attn_softcap": None}
PARITY_EXTRA = tuple(HARD_CODED) + ("name",)
# HF 5.25 defaults for keys a file may leave out
HF_DEFAULTS = {"num_key_value_heads": 4, "head_dim": 256, "global_head_dim": 512, "sliding_window": 512,
               "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262_144,
               "max_position_embeddings": 131_072}
_ACTS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none", "gelu_python": "none"}


def to_gemma4_config(s) -> dict:
    """The `Gemma4TextConfig` config.json dict of a family-4 spec (the text-only form)."""
    rope_full: dict = {"rope_type": "proportional", "partial_rotary_factor": s.rope_proportion,
                       "rope_theta": s.rope_base}
    if s.rope_scaling_factor != 1.0:
        rope_full["factor"] = s.rope_scaling_factor
    cfg: dict = {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": TEXT_MODEL_TYPE,
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "global_head_dim": s.global_head_dim or s.head_dim,
        "num_global_key_value_heads": s.num_global_kv_heads,
        "attention_k_eq_v": s.attention_k_eq_v,
        "max_position_embeddings": s.max_position,
        "rms_norm_eps": s.norm_eps,
        "hidden_activation": "gelu_pytorch_tanh" if s.gelu_approximate == "tanh" else "gelu",
        "tie_word_embeddings": s.tied_head,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": s.rope_local_base or s.rope_base},
            "full_attention": rope_full,
        },
        # HF's field is a strict int: a spec without local layers writes HF's default, which no layer uses
        "sliding_window": s.sliding_window or HF_DEFAULTS["sliding_window"],
        "layer_types": ["sliding_attention" if t == "local" else "full_attention" for t in s.layer_types],
        "final_logit_softcapping": s.final_softcap,
        "hidden_size_per_layer_input": s.ple_dim,
        "vocab_size_per_layer_input": s.ple_rows,
        "num_kv_shared_layers": s.num_kv_shared_layers,
        "use_double_wide_mlp": s.double_wide_mlp,
        "enable_moe_block": s.num_experts > 0,
        "num_experts": s.num_experts or None,
        "top_k_experts": s.top_k_experts or None,
        "moe_intermediate_size": s.expert_intermediate_size or None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": s.bos_token_id,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    extra = {f: getattr(s, f) for f, want in HARD_CODED.items() if getattr(s, f) != want}
    if s.name:
        extra["name"] = s.name
    cfg["parity"] = extra
    return cfg


def to_gemma4_multimodal_config(s) -> dict:
    """The same spec as the text part of a multimodal `Gemma4Config` (no vision or audio tower)."""
    text = to_gemma4_config(s)
    extra = text.pop("parity")
    text.pop("architectures")
    return {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": MULTIMODAL_MODEL_TYPE,
            "text_config": text, "vision_config": None, "audio_config": None,
            "tie_word_embeddings": s.tied_head, "parity": extra}


def gemma4_spec_fields(cfg: dict, where: str = "config.json") -> dict:
    """A family-4 spec's fields (GemmaSpec keyword arguments) from a Gemma4TextConfig dict or a multimodal
    Gemma4Config dict (its text_config)."""
    top = ConfigReader(cfg, where)
    if cfg.get("model_type") == MULTIMODAL_MODEL_TYPE:
        r = top.obj("text_config", nullable=False)
    else:
        r = top
    extra = top.obj("parity") or ConfigReader({}, where, "parity.")
    extra.only(PARITY_EXTRA)
    n = r.integer("num_hidden_layers", high=MAX_LAYERS)
    hidden, heads = r.integer("hidden_size"), r.integer("num_attention_heads")
    kv = r.integer("num_key_value_heads", HF_DEFAULTS["num_key_value_heads"])
    head_dim = r.integer("head_dim", HF_DEFAULTS["head_dim"])
    vocab = r.integer("vocab_size")
    act = r.get("hidden_activation", "gelu_pytorch_tanh")
    if not isinstance(act, str) or act not in _ACTS:
        raise r.bad("hidden_activation", act, "is not a GELU", f"Gemma uses gelu_pytorch_tanh (allowed: "
                    f"{', '.join(_ACTS)})")
    if r.cfg.get("use_bidirectional_attention") not in (None, "vision"):
        raise r.bad("use_bidirectional_attention", r.cfg["use_bidirectional_attention"], "makes text attention "
                    "non-causal", "parity compares causal decoders: use null or 'vision'")
    types = r.string_list("layer_types", HF_LAYER_TYPES, length=n)
    if types is None:  # HF's default: five sliding layers, then one full, the last forced full
        layer_types = tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(n - 1)) + ("global",)
    else:
        if types[-1] != "full_attention":
            raise r.bad("layer_types", f"[... {types[-1]!r}]", "ends with a sliding layer, which HF overwrites "
                        "with 'full_attention' (keras-hub does not)", "make the last entry 'full_attention'")
        layer_types = tuple("local" if t == "sliding_attention" else "global" for t in types)
    k_eq_v = r.boolean("attention_k_eq_v", False)
    global_hd, global_kv = _global_shapes(r, layer_types, k_eq_v)
    rope_base, rope_local, proportion, factor = _rope(r, "local" in layer_types)
    ple = r.integer("hidden_size_per_layer_input", HF_DEFAULTS["hidden_size_per_layer_input"], low=0)
    ple_rows = r.integer("vocab_size_per_layer_input", HF_DEFAULTS["vocab_size_per_layer_input"]) if ple else None
    shared = r.integer("num_kv_shared_layers", 0, low=0, high=MAX_LAYERS)
    moe = r.boolean("enable_moe_block", False)
    bos = r.integer("bos_token_id", 2, low=0, nullable=True)
    kw = dict(
        family=4,
        name=_name(extra, r, where),
        vocab_size=vocab, hidden_size=hidden, intermediate_size=r.integer("intermediate_size"),
        num_layers=n, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        max_position=r.integer("max_position_embeddings", HF_DEFAULTS["max_position_embeddings"]),
        norm_eps=r.number("rms_norm_eps", 1e-6, below=0.1),
        gelu_approximate=_ACTS[act],
        tied_head=r.boolean("tie_word_embeddings", top.boolean("tie_word_embeddings", True)),
        bos_token_id=2 if bos is None else bos,
        rope_base=rope_base, rope_local_base=rope_local, rope_scaling_factor=factor, rope_proportion=proportion,
        final_softcap=r.number("final_logit_softcapping", None, nullable=True),
        layer_types=layer_types,
        sliding_window=r.integer("sliding_window", HF_DEFAULTS["sliding_window"]) if "local" in layer_types
        else None,
        global_head_dim=global_hd, num_global_kv_heads=global_kv, attention_k_eq_v=k_eq_v,
        ple_dim=ple, ple_vocab_size=None if ple_rows in (None, vocab) else ple_rows,
        num_kv_shared_layers=shared,
        # HF widens only KV-shared layers: with none the flag changes nothing, and the spec says so
        double_wide_mlp=r.boolean("use_double_wide_mlp", False) and shared > 0,
        num_experts=r.integer("num_experts") if moe else 0,
        top_k_experts=r.integer("top_k_experts") if moe else 0,
        expert_intermediate_size=r.integer("moe_intermediate_size") if moe else 0,
        norm_placement=extra.choice("norm_placement", NORM_PLACEMENTS, HARD_CODED["norm_placement"]),
        norm_unit_offset=extra.boolean("norm_unit_offset", False),
        embed_scale=extra.boolean("embed_scale", True),
        embed_scale_dtype=extra.choice("embed_scale_dtype", SCALE_DTYPES, "activation"),
        qk_norm=extra.boolean("qk_norm", True),
        v_norm=extra.boolean("v_norm", True),
        layer_scalar=extra.boolean("layer_scalar", True),
        query_pre_attn_scalar=extra.number("query_pre_attn_scalar", 1.0, nullable=True),
        attn_softcap=extra.number("attn_softcap", None, nullable=True),
    )
    return kw


def _name(extra: ConfigReader, r: ConfigReader, where: str) -> str:
    """parity.name, else HF's _name_or_path, else the config's directory name, else the model type (as spec's)."""
    if extra.cfg.get("name") is not None:
        return extra.string("name")
    path = r.cfg.get("_name_or_path")
    return path if isinstance(path, str) and path else Path(str(where)).parent.name or TEXT_MODEL_TYPE


def _global_shapes(r: ConfigReader, layer_types, k_eq_v: bool) -> tuple[int | None, int | None]:
    """(global_head_dim, num_global_kv_heads) from the released keys or from HF 5.25's per_layer_config."""
    if "per_layer_config" in r.cfg and "global_head_dim" not in r.cfg:
        plc = r.obj("per_layer_config", nullable=False)
        seen = set()
        for key in plc.cfg:
            if not (isinstance(key, str) and key.isdigit() and int(key) < len(layer_types)):
                raise plc.bad(key, plc.cfg[key], "is not keyed by a layer index", "key it by layer number")
            if layer_types[int(key)] != "global":
                raise plc.bad(key, plc.cfg[key], "overrides a sliding layer", "parity reads per-type shapes: "
                              "override only full-attention layers")
            entry = plc.obj(key, nullable=False)
            seen.add((entry.integer("head_dim", None, nullable=True),
                      entry.integer("num_key_value_heads", None, nullable=True)))
        if len(seen) > 1:
            raise r.bad("per_layer_config", sorted(seen, key=str), "gives full-attention layers different shapes",
                        "parity needs one head_dim and one KV head count for all global layers")
        hd, kv = next(iter(seen)) if seen else (None, None)
        return hd, kv
    hd = r.integer("global_head_dim", HF_DEFAULTS["global_head_dim"])
    kv = r.integer("num_global_key_value_heads", None, nullable=True)
    return hd, kv if k_eq_v else None  # HF applies it only on K=V layers


def _rope(r: ConfigReader, has_local: bool) -> tuple[float, float | None, float, float]:
    """(global theta, local theta, global rope proportion, global scaling factor) from rope_parameters."""
    rope = r.obj("rope_parameters")
    if rope is None:  # HF's defaults
        return 1_000_000.0, 10_000.0 if has_local else None, 0.25, 1.0
    for key in rope.cfg:
        if key not in HF_LAYER_TYPES:
            raise rope.bad(key, rope.cfg[key], "is not a layer type", "Gemma 4 nests RoPE settings per layer type: "
                           f"use {' and '.join(HF_LAYER_TYPES)}")
    full = rope.obj("full_attention", nullable=False)
    kind = full.choice("rope_type", ("proportional", "default", "linear"), "default")
    base = full.number("rope_theta", 10_000.0)
    factor = full.number("factor", 1.0) if kind != "default" else 1.0
    proportion = full.number("partial_rotary_factor", 1.0) if kind == "proportional" else 1.0
    if proportion > 1:
        raise full.bad("partial_rotary_factor", proportion, "is above 1", "give the share of pairs that rotate, "
                       "in (0, 1]")
    local_base = None
    if has_local:
        local = rope.obj("sliding_attention", nullable=False)
        local.choice("rope_type", ("default",), "default")
        local_base = local.number("rope_theta", 10_000.0)
    return base, local_base, proportion, factor

