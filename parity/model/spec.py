"""Everything numeric about a Gemma architecture, as one frozen dataclass.

Numerics come from explicit fields, never from a model's name: the bugs this
tool hunts are exactly the ones where a library derived a number from a name
or a drifting config key. Every adapter builds its model from these fields,
and the diagnosis re-runs the reference port with one field changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from parity.errors import ParityInputError
from parity.model.config_checks import MAX_DIM, MAX_LAYERS, ConfigReader, read_config_file
from parity.model.gemma4_config import gemma4_spec_fields, to_gemma4_config

NormPlacement = Literal["pre", "sandwich"]
GeluApprox = Literal["tanh", "none"]

NORM_PLACEMENTS = ("pre", "sandwich")
GELU_APPROXIMATIONS = ("tanh", "none")
LAYER_TYPES = ("global", "local")
SCALE_DTYPES = ("activation", "float32", "bfloat16")  # bfloat16: a constant rounded to bf16 in every dtype
HF_MODEL_TYPES = {1: "gemma", 2: "gemma2", 3: "gemma3_text", 4: "gemma4_text"}
HF_LAYER_TYPES = ("full_attention", "sliding_attention")
# parity's own fields in config.json (what to_hf_config writes under "parity"); anything else there is a typo
PARITY_EXTRA = ("norm_placement", "norm_unit_offset", "embed_scale", "embed_scale_dtype", "qk_norm", "name",
                "query_pre_attn_scalar", "rope_scaling_factor")
HF_ARCHITECTURES = {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM", 4: "Gemma4ForCausalLM"}
FAMILIES = (1, 2, 3, 4)
# Gemma 4's fields (parity.model.gemma4_config reads and writes them); off by default, so Gemma 1-3 specs are unchanged
GEMMA4_FIELDS = {"v_norm": False, "global_head_dim": None, "num_global_kv_heads": None, "attention_k_eq_v": False,
                 "rope_proportion": 1.0, "layer_scalar": False, "ple_dim": 0, "ple_vocab_size": None,
                 "num_kv_shared_layers": 0, "double_wide_mlp": False, "num_experts": 0, "top_k_experts": 0,
                 "expert_intermediate_size": 0}


@dataclass(frozen=True)
class GemmaSpec:
    # --- which architecture family: picks the library class, not the numbers
    family: int = 1
    name: str = "tiny-gemma"
    # --- sizes
    vocab_size: int = 512
    hidden_size: int = 96
    intermediate_size: int = 256  # width of EACH of the two GeGLU halves (HF convention)
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_position: int = 512
    # --- RMSNorm
    norm_eps: float = 1e-6
    norm_unit_offset: bool = True  # multiply by (1 + w), w stored centred on 0
    norm_placement: NormPlacement = "pre"  # Gemma 1: pre only; Gemma 2/3: sandwich
    # --- MLP
    gelu_approximate: GeluApprox = "tanh"
    # --- embedding
    embed_scale: bool = True  # multiply embeddings by sqrt(hidden_size)
    embed_scale_dtype: str = "activation"  # the normaliser is rounded to the activation dtype
    tied_head: bool = True
    # --- attention
    rope_base: float = 10_000.0  # global layers (all layers in Gemma 1/2)
    rope_local_base: float | None = None  # Gemma 3 local layers
    rope_scaling_factor: float = 1.0  # linear position scaling on global layers (Gemma 3 4B+)
    query_pre_attn_scalar: float | None = None  # None: scale by 1/sqrt(head_dim)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = field(default=())  # per layer "global"|"local"; () = all global
    qk_norm: bool = False
    # --- Gemma 4 (family=4; docs/gemma4.md). Every default is "off", so Gemma 1-3 specs are unchanged.
    v_norm: bool = False  # scale-less RMSNorm over each head of v
    global_head_dim: int | None = None  # head dim on global layers (None: head_dim)
    num_global_kv_heads: int | None = None  # KV heads on global layers (None: num_kv_heads)
    attention_k_eq_v: bool = False  # global layers: k_proj's output feeds keys and values (no v_proj)
    rope_proportion: float = 1.0  # global layers: proportional RoPE (HF partial_rotary_factor); 1.0 = full RoPE
    layer_scalar: bool = False  # a learned per-layer scalar multiplies the block output
    ple_dim: int = 0  # per-layer embedding width (HF hidden_size_per_layer_input); 0 = none
    ple_vocab_size: int | None = None  # rows of the per-layer table (HF vocab_size_per_layer_input; None: vocab_size)
    num_kv_shared_layers: int = 0  # the last N layers reuse the K/V of the last non-shared layer of their type
    double_wide_mlp: bool = False  # MLP width 2 * intermediate_size on the KV-shared layers
    num_experts: int = 0  # mixture of experts beside the dense MLP (0: dense only)
    top_k_experts: int = 0  # experts chosen per token
    expert_intermediate_size: int = 0  # width of each expert's GeGLU halves
    # --- special tokens (only used to build prompts)
    bos_token_id: int = 2

    def __post_init__(self) -> None:
        n = self.num_layers  # checked first: the per-layer tuple below is built from it
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LAYERS:
            raise ParityInputError(f"spec {self.name!r}: num_layers={n!r} must be an integer in 1..{MAX_LAYERS}; "
                                   "real Gemmas have 18 to 62 layers")
        if not isinstance(self.layer_types, (tuple, list)):
            raise ParityInputError(f"spec {self.name!r}: layer_types={self.layer_types!r} is not a list; give one "
                                   "'global' or 'local' per layer")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("global",) * self.num_layers)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        # a global size equal to the local one is no separate size: one spelling, so equal specs compare equal
        if self.global_head_dim is not None and self.global_head_dim == self.head_dim:
            object.__setattr__(self, "global_head_dim", None)
        if self.num_global_kv_heads is not None and self.num_global_kv_heads == self.num_kv_heads:
            object.__setattr__(self, "num_global_kv_heads", None)
        validate(self)

    # ----------------------------------------------------------------- derived
    @property
    def query_scale(self) -> float:
        """The factor the attention scores are multiplied by."""
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return 1.0 / math.sqrt(scalar)

    @property
    def embed_normalizer(self) -> float:
        return math.sqrt(self.hidden_size) if self.embed_scale else 1.0

    def rope_base_for(self, layer: int) -> float:
        if self.layer_types[layer] == "local" and self.rope_local_base is not None:
            return self.rope_local_base
        return self.rope_base

    def rope_factor_for(self, layer: int) -> float:
        return 1.0 if self.layer_types[layer] == "local" else self.rope_scaling_factor

    def window_for(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "local" else None

    # --- per-layer shapes (Gemma 4 sizes local and global layers apart; Gemma 1-3 give the same for both)
    def head_dim_for(self, layer: int) -> int:
        return self.global_head_dim if self.layer_types[layer] == "global" and self.global_head_dim else self.head_dim

    def kv_heads_for(self, layer: int) -> int:
        if self.layer_types[layer] == "global" and self.num_global_kv_heads:
            return self.num_global_kv_heads
        return self.num_kv_heads

    def k_eq_v_for(self, layer: int) -> bool:
        return self.attention_k_eq_v and self.layer_types[layer] == "global"

    def rope_proportion_for(self, layer: int) -> float:
        return self.rope_proportion if self.layer_types[layer] == "global" else 1.0

    @property
    def first_kv_shared(self) -> int:
        """The first layer that reuses another layer's keys and values (num_layers when none does)."""
        return self.num_layers - self.num_kv_shared_layers

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values `layer` attends over: itself, or on a KV-shared layer the last
        non-shared layer of the same type (HF's and keras-hub's rule, GEMMA4.md "KV sharing")."""
        n = self.first_kv_shared
        if layer < n:
            return layer
        return max(j for j in range(n) if self.layer_types[j] == self.layer_types[layer])

    def mlp_width_for(self, layer: int) -> int:
        wide = self.double_wide_mlp and layer >= self.first_kv_shared
        return self.intermediate_size * (2 if wide else 1)

    @property
    def ple_rows(self) -> int:
        return self.ple_vocab_size or self.vocab_size

    def replace(self, **changes) -> "GemmaSpec":
        if "num_layers" in changes and "layer_types" not in changes and "local" not in self.layer_types:
            changes["layer_types"] = ()  # all-global layers follow the new depth
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GemmaSpec":
        if not isinstance(d, dict):
            raise ParityInputError(f"a spec must be a JSON object of its fields, not {type(d).__name__}; give "
                                   "GemmaSpec.to_dict()'s output")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ParityInputError(
                f"spec has unknown field(s) {unknown}; known fields are {sorted(known)}: remove or rename them"
            )
        d = dict(d)
        if "layer_types" in d and isinstance(d["layer_types"], list):
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)


def validate(s: GemmaSpec) -> None:
    """Refuse a spec whose numbers contradict each other, naming them."""

    def bad(msg: str) -> None:
        raise ParityInputError(f"spec {s.name!r}: {msg}")

    if not isinstance(s.family, int) or isinstance(s.family, bool) or s.family not in FAMILIES:
        bad(f"family={s.family!r} is not a Gemma family; use 1, 2, 3 or 4")
    if not isinstance(s.name, str):
        bad(f"name={s.name!r} is not a string; give the spec a name")
    # no coercion anywhere: a bool is not a size, a string not a flag, NaN and infinity not numbers
    for f in ("norm_unit_offset", "embed_scale", "tied_head", "qk_norm"):
        if not isinstance(getattr(s, f), bool):
            bad(f"{f}={getattr(s, f)!r} is not a boolean; give true or false")
    for f in ("norm_eps", "rope_base", "rope_scaling_factor", "rope_local_base", "query_pre_attn_scalar",
              "attn_softcap", "final_softcap"):
        v = getattr(s, f)
        if v is None and f not in ("norm_eps", "rope_base", "rope_scaling_factor"):
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            bad(f"{f}={v!r} is not a finite number; give one" + ("" if f in ("norm_eps", "rope_base",
                                                                               "rope_scaling_factor") else " or null"))
    if not isinstance(s.bos_token_id, int) or isinstance(s.bos_token_id, bool) or s.bos_token_id < 0:
        bad(f"bos_token_id={s.bos_token_id!r} must be a token id (an integer >= 0)")
    if s.sliding_window is not None and (not isinstance(s.sliding_window, int) or isinstance(s.sliding_window, bool)):
        bad(f"sliding_window={s.sliding_window!r} must be a positive integer or null")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "max_position"):
        v = getattr(s, f)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_DIM:
            bad(f"{f}={v!r} must be a positive integer up to {MAX_DIM}")
    if s.num_heads % s.num_kv_heads:
        bad(f"num_heads={s.num_heads} is not a multiple of num_kv_heads={s.num_kv_heads}; "
            "grouped-query attention needs whole groups")
    if s.head_dim % 2:
        bad(f"head_dim={s.head_dim} is odd; rotary embeddings rotate pairs, so it must be even")
    if s.vocab_size <= s.bos_token_id:
        bad(f"vocab_size={s.vocab_size} does not hold bos_token_id={s.bos_token_id}")
    if not (0 < s.norm_eps < 0.1):
        bad(f"norm_eps={s.norm_eps} is outside (0, 0.1); Gemma uses 1e-6")
    if s.norm_placement not in NORM_PLACEMENTS:
        bad(f"norm_placement={s.norm_placement!r}; use one of {NORM_PLACEMENTS}")
    if s.gelu_approximate not in GELU_APPROXIMATIONS:
        bad(f"gelu_approximate={s.gelu_approximate!r}; use one of {GELU_APPROXIMATIONS}")
    if s.embed_scale_dtype not in SCALE_DTYPES:
        bad(f"embed_scale_dtype={s.embed_scale_dtype!r}; use one of {SCALE_DTYPES}")
    if len(s.layer_types) != s.num_layers:
        bad(f"layer_types has {len(s.layer_types)} entries but num_layers={s.num_layers}")
    if any(t not in LAYER_TYPES for t in s.layer_types):
        bad(f"layer_types={list(s.layer_types)} may only hold {LAYER_TYPES}")
    has_local = "local" in s.layer_types
    if has_local and not s.sliding_window:
        bad("some layer_types are 'local' but sliding_window is not set; give the window size")
    if s.sliding_window is not None and s.sliding_window <= 0:
        bad(f"sliding_window={s.sliding_window} must be positive")
    if s.sliding_window and not has_local:
        bad(f"sliding_window={s.sliding_window} is set but no layer is 'local'; set layer_types")
    if s.rope_local_base is not None and not has_local:
        bad(f"rope_local_base={s.rope_local_base} is set but no layer is 'local'")
    for f in ("rope_base", "rope_scaling_factor"):
        if getattr(s, f) <= 0:
            bad(f"{f}={getattr(s, f)} must be positive")
    for f in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_base"):
        v = getattr(s, f)
        if v is not None and v <= 0:
            bad(f"{f}={v} must be positive or null")
    if s.family == 1:
        for f, off in (("attn_softcap", None), ("final_softcap", None), ("sliding_window", None),
                       ("qk_norm", False), ("rope_local_base", None)):
            if getattr(s, f) != off:
                bad(f"family=1 (Gemma 1) has no {f}, but it is {getattr(s, f)!r}; "
                    "set family=2 or 3, or drop the field")
    if s.family == 2 and s.qk_norm:
        bad("family=2 (Gemma 2) has no qk_norm; it first appears in Gemma 3 (family=3)")
    _validate_gemma4(s, bad)


def _validate_gemma4(s: GemmaSpec, bad) -> None:
    """The Gemma 4 fields: types, then the contradictions between them, each naming the fields."""
    if s.family != 4:
        for f, off in GEMMA4_FIELDS.items():
            if getattr(s, f) != off:
                bad(f"family={s.family} has no {f} (it is {getattr(s, f)!r}); it is a Gemma 4 field: set family=4 "
                    f"or drop it")
        return
    for f in ("v_norm", "attention_k_eq_v", "layer_scalar", "double_wide_mlp"):
        if not isinstance(getattr(s, f), bool):
            bad(f"{f}={getattr(s, f)!r} is not a boolean; give true or false")
    for f, low in (("ple_dim", 0), ("num_kv_shared_layers", 0), ("num_experts", 0), ("top_k_experts", 0),
                   ("expert_intermediate_size", 0), ("global_head_dim", 1), ("num_global_kv_heads", 1),
                   ("ple_vocab_size", 1)):
        v = getattr(s, f)
        if v is None and low == 1:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= MAX_DIM:
            bad(f"{f}={v!r} must be an integer in {low}..{MAX_DIM}" + (" or null" if low == 1 else ""))
    r = s.rope_proportion
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or not 0 < r <= 1:
        bad(f"rope_proportion={r!r} is outside (0, 1]; it is the share of a global head's rotary pairs that turn "
            "(Gemma 4: 0.25; 1.0 for full RoPE)")
    if s.global_head_dim is not None and s.global_head_dim % 2:
        bad(f"global_head_dim={s.global_head_dim} is odd; rotary embeddings rotate pairs, so it must be even")
    if s.num_global_kv_heads is not None:
        if s.num_heads % s.num_global_kv_heads:
            bad(f"num_heads={s.num_heads} is not a multiple of num_global_kv_heads={s.num_global_kv_heads}; "
                "grouped-query attention needs whole groups")
        if not s.attention_k_eq_v:
            bad(f"num_global_kv_heads={s.num_global_kv_heads} is set but attention_k_eq_v is false; HF applies "
                "num_global_key_value_heads only on K=V layers: set attention_k_eq_v or drop num_global_kv_heads")
    if s.ple_vocab_size is not None and not s.ple_dim:
        bad(f"ple_vocab_size={s.ple_vocab_size} is set but ple_dim=0 (no per-layer embeddings); give ple_dim or drop "
            "ple_vocab_size")
    if s.ple_vocab_size is not None and s.ple_vocab_size > s.vocab_size:
        bad(f"ple_vocab_size={s.ple_vocab_size} exceeds vocab_size={s.vocab_size}; the per-layer table covers the "
            "text vocabulary at most")
    if s.ple_dim * s.num_layers > MAX_DIM:
        bad(f"ple_dim={s.ple_dim} * num_layers={s.num_layers} exceeds {MAX_DIM}, the per-layer table's width")
    n_shared = s.num_kv_shared_layers
    if n_shared >= s.num_layers:
        bad(f"num_kv_shared_layers={n_shared} >= num_layers={s.num_layers}; at least one layer must compute the "
            "keys and values the shared layers read")
    first = s.num_layers - n_shared
    for t in sorted(set(s.layer_types[first:])):
        if t not in s.layer_types[:first]:
            bad(f"num_kv_shared_layers={n_shared}: layer_types has a shared {t!r} layer but no {t!r} layer before "
                f"layer {first} to produce its keys and values; share fewer layers or reorder layer_types")
    if s.double_wide_mlp and not n_shared:
        bad("double_wide_mlp is set but num_kv_shared_layers=0, so no layer is widened; drop one of them")
    if s.num_experts:
        if not 1 <= s.top_k_experts <= s.num_experts:
            bad(f"top_k_experts={s.top_k_experts} is outside 1..num_experts={s.num_experts}; choose at least one "
                "expert and no more than exist")
        if not s.expert_intermediate_size:
            bad(f"num_experts={s.num_experts} but expert_intermediate_size=0; give each expert's width")
    else:
        for f in ("top_k_experts", "expert_intermediate_size"):
            if getattr(s, f):
                bad(f"{f}={getattr(s, f)} is set but num_experts=0 (no mixture of experts); give num_experts or "
                    f"drop {f}")


# --------------------------------------------------------------- config.json
def to_hf_config(s: GemmaSpec) -> dict:
    """A HuggingFace config.json dict for this spec.

    Choices HF cannot express (a missing unit offset, a norm placement
    contrary to the family) go under a "parity" key, which HF ignores and
    `from_hf_config` reads back, so the round trip is exact.
    """
    if s.family == 4:
        return to_gemma4_config(s)
    act = "gelu_pytorch_tanh" if s.gelu_approximate == "tanh" else "gelu"
    cfg: dict = {
        "architectures": [HF_ARCHITECTURES[s.family]],
        "model_type": HF_MODEL_TYPES[s.family],
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "max_position_embeddings": s.max_position,
        "rms_norm_eps": s.norm_eps,
        "hidden_act": act,
        "hidden_activation": act,
        "rope_theta": s.rope_base,
        "tie_word_embeddings": s.tied_head,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": s.bos_token_id,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    if s.family >= 2:
        q = s.query_pre_attn_scalar or s.head_dim
        cfg["query_pre_attn_scalar"] = int(q) if float(q).is_integer() else q  # HF's config wants an int
        cfg["attn_logit_softcapping"] = s.attn_softcap
        cfg["final_logit_softcapping"] = s.final_softcap
        cfg["sliding_window"] = s.sliding_window
        cfg["layer_types"] = [
            "sliding_attention" if t == "local" else "full_attention" for t in s.layer_types
        ]
    if s.family == 3:
        cfg["rope_local_base_freq"] = s.rope_local_base or s.rope_base
        cfg["rope_scaling"] = (
            {"rope_type": "linear", "factor": s.rope_scaling_factor}
            if s.rope_scaling_factor != 1.0 else None
        )
    extra = {}
    default_placement = "pre" if s.family == 1 else "sandwich"
    if s.norm_placement != default_placement:
        extra["norm_placement"] = s.norm_placement
    for f, default in (("norm_unit_offset", True), ("embed_scale", True),
                       ("embed_scale_dtype", "activation"), ("qk_norm", s.family == 3),
                       ("name", None)):
        if getattr(s, f) != default:
            extra[f] = getattr(s, f)
    if s.family == 1 and s.query_pre_attn_scalar is not None:
        extra["query_pre_attn_scalar"] = s.query_pre_attn_scalar
    if s.family < 3 and s.rope_scaling_factor != 1.0:
        extra["rope_scaling_factor"] = s.rope_scaling_factor
    if extra:
        cfg["parity"] = extra
    return cfg


def from_hf_config(cfg: dict, where: str = "config.json") -> GemmaSpec:
    """Read a HuggingFace Gemma 1/2/3/4 (text) config.json dict into a spec (Gemma 4: parity.model.gemma4_config).

    Every field is read by type (parity.model.config_checks): a string, a bool, a fraction or a
    non-finite number where a size or a float belongs is refused naming the field, never coerced.
    """
    if not isinstance(cfg, dict):
        raise ParityInputError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    top = ConfigReader(cfg, where)
    mt = cfg.get("model_type")
    if mt in ("gemma4", "gemma4_text"):
        return GemmaSpec(**gemma4_spec_fields(cfg, where))
    families = {v: k for k, v in HF_MODEL_TYPES.items()} | {"gemma3": 3}
    if "text_config" in cfg:  # Gemma 3 multimodal wrapper: numerics live in text_config
        text = top.obj("text_config", nullable=False)
        r = ConfigReader({**text.cfg, "model_type": "gemma3_text"}, where, "text_config.")
        mt = "gemma3_text"
    else:
        r = top
    if not isinstance(mt, str) or mt not in families:
        raise ParityInputError(
            f"{where}: model_type={mt!r} is not a Gemma text model; expected one of {sorted(families)}"
        )
    family = families[mt]
    acts = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none",
            "gelu_python": "none"}
    key = "hidden_activation" if r.cfg.get("hidden_activation") is not None else "hidden_act"
    act = r.get(key, "gelu_pytorch_tanh")
    if act is None:  # Gemma 1 configs carry hidden_activation: null beside hidden_act
        act = "gelu_pytorch_tanh"
    if not isinstance(act, str) or act not in acts:
        raise r.bad(key, act, "is not a GELU", f"Gemma uses gelu_pytorch_tanh (allowed: {', '.join(acts)})")
    approx = acts[act]
    extra = top.obj("parity") or ConfigReader({}, where, "parity.")
    extra.only(PARITY_EXTRA)
    rope = r.obj("rope_parameters")
    # transformers 5 nests rope numbers per layer type; older configs keep them flat
    full = (rope.obj("full_attention") if "full_attention" in rope.cfg else rope) if rope else None
    local = rope.obj("sliding_attention") if rope else None
    rope_base = full.number("rope_theta") if full and "rope_theta" in full.cfg else r.number("rope_theta", 10_000.0)
    n_layers = r.integer("num_hidden_layers", high=MAX_LAYERS)
    hidden = r.integer("hidden_size")
    heads = r.integer("num_attention_heads")
    kv = r.integer("num_key_value_heads", heads)
    if heads % kv:
        raise r.bad("num_key_value_heads", kv, f"does not divide num_attention_heads={heads}",
                    "grouped-query attention needs whole groups: give a divisor")
    if "head_dim" not in r.cfg and hidden % heads:
        raise r.bad("hidden_size", hidden, f"is not a multiple of num_attention_heads={heads} and head_dim is not "
                    "given", "add head_dim")
    head_dim = r.integer("head_dim", hidden // heads)
    if head_dim % 2:
        raise r.bad("head_dim", head_dim, "is odd", "rotary embeddings rotate pairs: give an even head_dim")
    vocab = r.integer("vocab_size")
    bos = r.integer("bos_token_id", 2, low=0, nullable=True)
    bos = 2 if bos is None else bos
    if bos >= vocab:
        raise r.bad("bos_token_id", bos, f"is outside the vocabulary (vocab_size={vocab})",
                    "give an id below vocab_size")
    kw: dict = dict(
        family=family,
        name=_name(extra, r, where, mt),
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=r.integer("intermediate_size"),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        max_position=r.integer("max_position_embeddings", 8192),
        norm_eps=r.number("rms_norm_eps", 1e-6, below=0.1),
        gelu_approximate=approx,
        rope_base=rope_base,
        tied_head=r.boolean("tie_word_embeddings", True),
        bos_token_id=bos,
        norm_placement=extra.choice("norm_placement", NORM_PLACEMENTS, "pre" if family == 1 else "sandwich"),
        norm_unit_offset=extra.boolean("norm_unit_offset", True),
        embed_scale=extra.boolean("embed_scale", True),
        embed_scale_dtype=extra.choice("embed_scale_dtype", SCALE_DTYPES, "activation"),
        qk_norm=extra.boolean("qk_norm", family == 3),
    )
    if family == 1:
        kw["query_pre_attn_scalar"] = extra.number("query_pre_attn_scalar", None, nullable=True)
        kw["rope_scaling_factor"] = extra.number("rope_scaling_factor", 1.0)
    else:
        kw["query_pre_attn_scalar"] = r.number("query_pre_attn_scalar", None, nullable=True)
        kw["attn_softcap"] = r.number("attn_logit_softcapping", None, nullable=True)
        kw["final_softcap"] = r.number("final_logit_softcapping", None, nullable=True)
        types = r.string_list("layer_types", HF_LAYER_TYPES, length=n_layers)
        if types is None:
            period = r.integer("sliding_window_pattern", 6, nullable=True) or 6
            kw["layer_types"] = gemma_layer_types(family, n_layers, period)
        else:
            kw["layer_types"] = tuple("local" if t == "sliding_attention" else "global" for t in types)
        window = r.integer("sliding_window", None, nullable=True)
        if "local" in kw["layer_types"] and window is None:
            raise r.bad("sliding_window", window, "is null but some layers use sliding attention",
                        "give the window size in tokens")
        kw["sliding_window"] = window if "local" in kw["layer_types"] else None
        if family == 2:
            kw["rope_scaling_factor"] = extra.number("rope_scaling_factor", 1.0)
    if family == 3:
        kw["rope_local_base"] = (local.number("rope_theta") if local and "rope_theta" in local.cfg
                                 else r.number("rope_local_base_freq", 10_000.0))
        scaling = r.obj("rope_scaling")
        if scaling is None and full is not None and full.cfg.get("rope_type") == "linear":
            scaling = full
        if scaling is not None:
            scaling.choice("rope_type", ("linear", "default"), "linear")
        kw["rope_scaling_factor"] = scaling.number("factor", 1.0) if scaling else 1.0
    return GemmaSpec(**kw)


def _name(extra: ConfigReader, r: ConfigReader, where: str, model_type: str) -> str:
    """parity.name, else HF's _name_or_path, else the config's directory name, else the model type."""
    if extra.cfg.get("name") is not None:
        return extra.string("name")
    path = r.cfg.get("_name_or_path")
    return path if isinstance(path, str) and path else Path(str(where)).parent.name or model_type


def load_config_json(path: str | Path) -> GemmaSpec:
    cfg, p = read_config_file(path)
    return from_hf_config(cfg, where=str(p))


def save_config_json(spec: GemmaSpec, path: str | Path) -> Path:
    p = Path(path)
    if p.suffix != ".json":
        p = p / "config.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_hf_config(spec), indent=2) + "\n")
    return p


def truncate(spec: GemmaSpec, n: int) -> GemmaSpec:
    """The spec's first n layers, as a model of their own (the final norm and head on top of layer n-1)."""
    if not 1 <= n <= spec.num_layers:
        raise ParityInputError(f"{{option}} {n} is outside 1..{spec.num_layers} (the spec's layers); "
                               "give a depth the spec has", option="first_layers")
    if n == spec.num_layers:
        return spec
    # KV-shared layers are the last ones: the truncation keeps those of them it reaches
    shared = max(0, n - spec.first_kv_shared)
    return spec.replace(num_layers=n, layer_types=spec.layer_types[:n], name=f"{spec.name} (first {n} layers)",
                        num_kv_shared_layers=shared, double_wide_mlp=spec.double_wide_mlp and shared > 0)


def gemma_layer_types(family: int, n: int, period: int = 6) -> tuple[str, ...]:
    """Gemma's local/global layer pattern, the one home of it.

    Gemma 1: every layer global. Gemma 2: even layers local, odd layers global
    (HF, litgpt and keras-hub agree; one third-party description says odd).
    Gemma 3: `period - 1` local layers, then one global (HF's
    sliding_window_pattern, 6; keras-hub's `i % 6 < 5`).
    """
    if family == 1:
        return ("global",) * n
    if family == 2:
        return tuple("local" if i % 2 == 0 else "global" for i in range(n))
    return tuple("global" if (i + 1) % period == 0 else "local" for i in range(n))
