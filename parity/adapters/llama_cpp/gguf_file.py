"""The GGUF file llama.cpp loads, written from the canonical weights, and read back to canonical tensors.

Written with gguf-py's `GGUFWriter` (convert_hf_to_gguf.py needs a tokenizer a tiny checkpoint lacks): the
metadata keys exactly as the vendored llama.cpp's `load_arch_hparams` (src/models/gemma{,2,3}.cpp) reads them,
`tokenizer.ggml.model = "none"` (LLAMA_VOCAB_TYPE_NONE: V dummy tokens; ids go straight into `llama_batch`),
tensor names from `gguf.get_tensor_name_map`, Gemma's `(1 + w)` folded into every norm weight as
convert_hf_to_gguf.py does (llama.cpp multiplies by the stored weight; Gemma 4's norms have no offset and get no
fold, as conversion/gemma.py's Gemma4Model.norm_shift is 0). Gemma 4 (src/models/gemma4.cpp) adds the keys and
tensors of `_gemma4_metadata` / `GEMMA4_NAMES` and the generated `rope_freqs` tensor. Norms stay F32 (as the converter keeps
them); every matrix (but Gemma 4's F32 router, and an F16 fallback where the block does not divide a row, as
the converter does) is written in the chosen weight type: F16/BF16/Q8_0/Q4_0 by gguf.quants, Q4_K by llama.cpp's
own C quantizer (`llama_model_quantize`) on the F32 file, since gguf-py cannot quantize K-quants.

Files go to parity's cache (parity.model.weight_store.cache_dir()/llama-cpp), keyed by the weights' hash, the
spec and the weight type, so `held()` and `build()` read the same file and it is written once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from parity.adapters.held_tensors import HeldTensors as SharedHeldTensors
from parity.model.canonical import canonical_shapes
from parity.model.spec import GemmaSpec
from parity.model.weights import Weights

ARCH = {1: "gemma", 2: "gemma2", 3: "gemma3", 4: "gemma4"}
WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k")
K_QUANTS = ("q4_k",)
K_BLOCK = 256  # a K-quant super-block: every row length must be a multiple of it
# how ggml-cpu's matmul rounds the activation row for each weight type (its vec_dot_type; ggml-cpu.c type_traits)
ACTIVATIONS = {"f32": None, "f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q8_0", "q4_k": "q8_K"}


def activations(weight_type: str) -> str | None:
    """ACTIVATIONS, with q8_0 as this machine's ggml-cpu rounds it: x86's SIMD path rounds half to even
    (parity.numerics.act_quant "q8_0-x86"); elsewhere the generic C's round-half-away ("q8_0") is assumed (ARM's
    NEON path rounds x / d half to even, a third variant not modelled)."""
    import platform

    kind = ACTIVATIONS[weight_type]
    if kind == "q8_0" and platform.machine().lower() in ("x86_64", "amd64"):
        return "q8_0-x86"
    return kind
# llama_ftype values for llama_model_quantize (include/llama.h)
FTYPE = {"q4_k": 15}  # LLAMA_FTYPE_MOSTLY_Q4_K_M, with `pure` set: every matrix Q4_K (no Q6_K mix)

# bumped whenever what `write` puts in a file changes: part of the cache key, so no stale file is reused
WRITER = 1

# Metadata as a plain mapping key -> (value, GGUFValueType name, array sub-type name or None): the form an
# `edit` hook (fault injection in tests) changes before the file is written.
Metadata = dict


def _qtype(weight_type: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[weight_type]


def metadata(spec: GemmaSpec) -> Metadata:
    """Every key the vendored llama.cpp reads for this Gemma family, with the value the spec asks for."""
    arch = ARCH[spec.family]
    a = f"{arch}."
    md: Metadata = {
        "general.architecture": (arch, "STRING", None),
        "general.name": (spec.name, "STRING", None),
        a + "context_length": (int(spec.max_position), "UINT32", None),
        a + "embedding_length": (spec.hidden_size, "UINT32", None),
        a + "block_count": (spec.num_layers, "UINT32", None),
        a + "feed_forward_length": (spec.intermediate_size, "UINT32", None),
        a + "attention.head_count": (spec.num_heads, "UINT32", None),
        a + "attention.head_count_kv": (spec.num_kv_heads, "UINT32", None),
        a + "attention.layer_norm_rms_epsilon": (float(spec.norm_eps), "FLOAT32", None),
        a + "attention.key_length": (spec.head_dim, "UINT32", None),
        a + "attention.value_length": (spec.head_dim, "UINT32", None),
        a + "rope.freq_base": (float(spec.rope_base), "FLOAT32", None),
        a + "vocab_size": (spec.vocab_size, "UINT32", None),
        "tokenizer.ggml.model": ("none", "STRING", None),
    }
    sliding = [t == "local" for t in spec.layer_types] or [False] * spec.num_layers
    if spec.family == 2:
        md[a + "attn_logit_softcapping"] = (float(spec.attn_softcap), "FLOAT32", None)
        md[a + "final_logit_softcapping"] = (float(spec.final_softcap), "FLOAT32", None)
        # gemma2.cpp defaults the window to 4096 and the pattern to period 2: both always written
        md[a + "attention.sliding_window"] = (int(spec.sliding_window or 0), "UINT32", None)
        md[a + "attention.sliding_window_pattern"] = (sliding if spec.sliding_window else [False] * spec.num_layers,
                                                      "ARRAY", "BOOL")
    if spec.family == 3:
        if spec.final_softcap is not None:
            md[a + "final_logit_softcapping"] = (float(spec.final_softcap), "FLOAT32", None)
        if spec.sliding_window:
            md[a + "attention.sliding_window"] = (int(spec.sliding_window), "UINT32", None)
            md[a + "attention.sliding_window_pattern"] = (sliding, "ARRAY", "BOOL")
            md[a + "rope.freq_base_swa"] = (float(spec.rope_local_base or spec.rope_base), "FLOAT32", None)
        if spec.rope_scaling_factor != 1.0:
            md[a + "rope.scaling.type"] = ("linear", "STRING", None)
            md[a + "rope.scaling.factor"] = (float(spec.rope_scaling_factor), "FLOAT32", None)
    if spec.family == 4:
        md.update(_gemma4_metadata(spec, a, sliding))
    return md


def _gemma4_metadata(spec: GemmaSpec, a: str, sliding: list[bool]) -> Metadata:
    """The keys conversion/gemma.py's Gemma4Model writes and src/models/gemma4.cpp's load_arch_hparams (with
    llama-model.cpp's shared loader) reads: head sizes full (key_length) and SWA (key_length_swa), per-layer KV
    heads and MLP widths as arrays where they differ, the RoPE dimension counts (the whole global head: the
    proportional share is the rope_freqs tensor), the shared-KV count, the PLE width, the experts."""
    L = spec.num_layers
    g = spec.global_head_dim or spec.head_dim
    md: Metadata = {
        a + "attention.key_length": (g, "UINT32", None),
        a + "attention.value_length": (g, "UINT32", None),
        a + "attention.key_length_swa": (spec.head_dim, "UINT32", None),
        a + "attention.value_length_swa": (spec.head_dim, "UINT32", None),
        a + "rope.dimension_count": (g, "UINT32", None),
        a + "rope.dimension_count_swa": (spec.head_dim, "UINT32", None),
        a + "rope.freq_base_swa": (float(spec.rope_local_base or spec.rope_base), "FLOAT32", None),
        a + "attention.sliding_window": (int(spec.sliding_window or 0), "UINT32", None),
        a + "attention.sliding_window_pattern": (sliding, "ARRAY", "BOOL"),
        a + "attention.shared_kv_layers": (spec.num_kv_shared_layers, "UINT32", None),
        a + "embedding_length_per_layer_input": (spec.ple_dim, "UINT32", None),
    }
    if spec.final_softcap is not None:
        md[a + "final_logit_softcapping"] = (float(spec.final_softcap), "FLOAT32", None)
    if spec.rope_scaling_factor != 1.0:  # global layers only (rope_freq_scale_train_swa stays 1), as Gemma 3
        md[a + "rope.scaling.type"] = ("linear", "STRING", None)
        md[a + "rope.scaling.factor"] = (float(spec.rope_scaling_factor), "FLOAT32", None)
    if spec.num_global_kv_heads:  # the converter writes the array only when the global count is set
        md[a + "attention.head_count_kv"] = ([spec.kv_heads_for(i) for i in range(L)], "ARRAY", "UINT32")
    if spec.double_wide_mlp:
        md[a + "feed_forward_length"] = ([spec.mlp_width_for(i) for i in range(L)], "ARRAY", "UINT32")
    if spec.num_experts:
        md[a + "expert_count"] = (spec.num_experts, "UINT32", None)
        md[a + "expert_used_count"] = (spec.top_k_experts, "UINT32", None)
        md[a + "expert_feed_forward_length"] = (spec.expert_intermediate_size, "UINT32", None)
    return md


# Gemma 4 tensors gguf-py's name map does not give as the converter writes them (conversion/gemma.py
# Gemma4Model.filter_tensors / modify_tensors): canonical suffix -> GGUF name pattern
GEMMA4_NAMES = {
    "experts.gate_up_proj": "blk.{i}.ffn_gate_up_exps.weight",  # [E, 2I, D]: gate rows, then up rows
    "experts.down_proj": "blk.{i}.ffn_down_exps.weight",
    "router.scale": "blk.{i}.ffn_gate_inp.scale",
    "router.per_expert_scale": "blk.{i}.ffn_down_exps.scale",  # llama.cpp: ffn_down_exps_s, on each expert's out
    "layer_scalar": "blk.{i}.layer_output_scale.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Gemma 4's proportional RoPE on global layers (not a canonical tensor)
# tensors the converter keeps F32 whatever the file type (conversion/base.py: FFN_GATE_INP, 1-D, norms)
F32_ALWAYS = (".ffn_gate_inp.weight",)


def rope_freqs(spec: GemmaSpec) -> np.ndarray:
    """Gemma4Model.generate_extra_tensors: a freq factor per rotary pair of the global head, 1 for the
    int(hd * p / 2) rotated pairs and 1e30 for the rest (their angle pos * theta_j / 1e30 is ~0: they pass
    through), so ggml's NEOX RoPE over the whole head computes proportional RoPE."""
    g = spec.global_head_dim or spec.head_dim
    n = int(g * spec.rope_proportion / 2)
    return np.array([1.0] * n + [1e30] * (g // 2 - n), np.float32)


def _unit_offset(spec: GemmaSpec, canon: str) -> bool:
    """Whether the file holds 1 + w for this tensor (llama.cpp multiplies every norm by the stored weight):
    Gemma 1-3's norms, not Gemma 4's (Gemma4Model.norm_shift is 0), unless a spec asks for the offset."""
    return spec.norm_unit_offset and canon.endswith("norm.weight")


def tensor_names(spec: GemmaSpec) -> dict[str, str]:
    """canonical name -> GGUF tensor name (lm_head is skipped: llama.cpp ties it to token_embd)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCH[spec.family].upper()], spec.num_layers)
    out = {}
    for k in canonical_shapes(spec):
        if k == "lm_head.weight":
            continue
        if spec.family == 4 and k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            if rest in GEMMA4_NAMES:
                out[k] = GEMMA4_NAMES[rest].format(i=i)
                continue
        g = names.get_name(k, try_suffixes=(".weight",))
        if g is None:
            raise RuntimeError(f"llama-cpp: gguf {gguf.__version__} has no tensor name for {k!r}; update "
                               "parity/adapters/llama_cpp/gguf_file.py")
        out[k] = g
    return out


def _canonical(weights: Weights, name: str) -> np.ndarray:
    out = np.empty(weights.shape(name), np.float32)
    weights.read_into(name, out)
    return out


def write(spec: GemmaSpec, weights: Weights, weight_type: str, path: Path,
          edit: Callable[[Metadata], None] | None = None) -> Path:
    """The GGUF for `weight_type` (f32/f16/bf16/q8_0/q4_0; a K-quant: see `quantized`) at `path`."""
    import gguf

    md = metadata(spec)
    if edit is not None:
        edit(md)
    w = gguf.GGUFWriter(str(path), md["general.architecture"][0])
    for key, (value, vtype, sub) in md.items():
        if key == "general.architecture":
            continue  # the writer adds it from its `arch` argument
        w.add_key_value(key, value, gguf.GGUFValueType[vtype],
                        sub_type=gguf.GGUFValueType[sub] if sub else None)
    qtype = _qtype(weight_type)
    for canon, g in tensor_names(spec).items():
        v = _canonical(weights, canon)
        if _unit_offset(spec, canon):
            v = v + np.float32(1.0)  # Gemma's (1 + w), folded as convert_hf_to_gguf.py does; exact in float32
        if v.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32 or g.endswith(F32_ALWAYS):
            w.add_tensor(g, v)
            continue
        try:
            q, t = gguf.quants.quantize(v, qtype), qtype  # [rows, bytes per row] (uint8 blocks, or f16/bf16)
        except gguf.QuantError:  # a row length the block does not divide: F16, as the converter falls back
            q, t = gguf.quants.quantize(v, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16
        w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=t)
    if spec.family == 4:
        w.add_tensor(ROPE_FREQS, rope_freqs(spec))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantized(src: Path, weight_type: str, path: Path) -> Path:
    """A K-quant file made by llama.cpp's own C quantizer from the F32 file (gguf-py cannot write K-quants)."""
    import llama_cpp

    from parity.adapters.llama_cpp.capture import quiet

    quiet()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPE[weight_type]
    params.nthread = 1
    params.pure = True  # every matrix the one type (Q4_K_M alone mixes in Q6_K): one activation rounding, q8_K
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama-cpp: llama_model_quantize({weight_type}) returned {rc}")
    return path


def cached(spec: GemmaSpec, weights: Weights, weight_type: str,
           edit: Callable[[Metadata], None] | None = None) -> Path:
    """The GGUF `build` loads and `held` reads: written once per weights, spec and weight type.

    An edited file (a test's fault) is never cached: it goes to a fresh temporary folder."""
    from parity.model.weight_store import cache_dir

    if edit is not None:
        folder = Path(tempfile.mkdtemp(prefix="parity-llama-cpp-edit-"))
    else:
        folder = cache_dir() / "llama-cpp"
        folder.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    # the file depends on the weights, the spec, this writer, gguf-py, and (K-quants) llama.cpp's C quantizer
    made_by = [WRITER, version("gguf")] + ([version("llama-cpp-python")] if weight_type in K_QUANTS else [])
    key = hashlib.sha256(json.dumps([weights.hash, spec.to_dict(), made_by], sort_keys=True, default=str).encode())
    stem = f"{spec.name}-{key.hexdigest()[:16]}"
    path = folder / f"{stem}-{weight_type}.gguf"
    if path.exists():
        return path
    if weight_type in K_QUANTS:
        base = cached(spec, weights, "f32", edit) if edit is None else write(spec, weights, "f32",
                                                                             folder / f"{stem}-f32.gguf", edit)
        make = lambda tmp: quantized(base, weight_type, tmp)  # noqa: E731
    else:
        make = lambda tmp: write(spec, weights, weight_type, tmp, edit)  # noqa: E731
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        make(tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------ reading back
class HeldTensors(SharedHeldTensors):
    """The canonical tensors as a GGUF holds them, dequantized one at a time when asked (float32, canonical names
    and layout, the norm fold undone): a real-size file's 2 GB embedding is never held beside the others. The
    reader memory-maps the file; nothing is cached, so each access dequantizes again."""

    def __init__(self, spec: GemmaSpec, path: Path) -> None:
        import gguf

        self._reader = gguf.GGUFReader(str(path))
        self._by_name = {t.name: t for t in self._reader.tensors}
        self._shapes = canonical_shapes(spec)
        self._spec = spec
        self._gguf_names = tensor_names(spec)
        if "lm_head.weight" in self._shapes:  # an untied spec is refused by check; kept for completeness
            self._gguf_names = {**self._gguf_names, "lm_head.weight": self._gguf_names["model.embed_tokens.weight"]}
        super().__init__(self._dequantize, self._gguf_names)

    def _dequantize(self, canon: str) -> np.ndarray:
        import gguf

        t = self._by_name[self._gguf_names[canon]]
        # dequantize gives the logical shape, ggml's ne reversed: [rows, cols] as the canonical layout
        v = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(self._shapes[canon])
        if _unit_offset(self._spec, canon):
            # undo the fold: fl(1 + w) - 1 is exact in float32 (Sterbenz), so 1 + held is what llama.cpp
            # multiplies by, bit for bit (not w itself: fl(1 + w) dropped w's bits below 2^-23)
            v = v - np.float32(1.0)
        return v

    def types(self) -> dict[str, str]:
        """Each canonical tensor's stored GGML type name."""
        return {c: self._by_name[g].tensor_type.name for c, g in self._gguf_names.items()}


def read_back(spec: GemmaSpec, path: Path) -> tuple[HeldTensors, dict[str, str]]:
    """The canonical tensors as the file holds them (HeldTensors: dequantized when read), and each tensor's
    stored GGML type name."""
    held = HeldTensors(spec, path)
    return held, held.types()


def read_metadata(path: Path) -> dict:
    """The file's key/values as Python values (strings decoded, arrays as lists)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out
