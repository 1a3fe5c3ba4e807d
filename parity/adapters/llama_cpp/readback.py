"""What llama.cpp loaded, read back: the GGUF metadata as its loader parsed it (llama_model_meta_val_str and the
llama_model_* getters), with the defaults its Gemma loaders apply to a key that is absent (src/models/gemma2.cpp:
attention softcap 50, final softcap 30, window 4096, local RoPE base = the global one; gemma3.cpp: final softcap
none, local RoPE base 10000; llama-hparams.h), and the tensors the file holds (norm weights as stored, which
tensors exist). Nothing is copied from the spec: a key the file lacks or a value it holds differently shows as a
differing property.

What llama.cpp's graph hard-codes (no key): the GELU is ggml's tanh approximation, on the gate; the embeddings
are scaled by sqrtf(n_embd) in float32; the head is the embedding when the file has no output.weight; the query
scale is 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B layer counts (46 for Gemma 2, 62 for Gemma 3).
ggml-cpu's f32 GELU (GGML_GELU_FP16, ggml-cpu/vec.h) rounds its input to float16 and looks the result up in a
float16 table: gelu(gate) carries float16 rounding even in a float32 run (noted under `library`).
"""

from __future__ import annotations

import ctypes
import json

import numpy as np

from parity.model.effective import report


def meta(model) -> dict[str, str]:
    """Every key/value llama.cpp's loader kept, as strings (arrays as llama.cpp prints them)."""
    import llama_cpp

    out = {}
    buf = ctypes.create_string_buffer(1 << 16)
    for j in range(llama_cpp.llama_model_meta_count(model)):
        n = llama_cpp.llama_model_meta_key_by_index(model, j, buf, len(buf))
        key = buf.value.decode() if n >= 0 else f"?{j}"
        n = llama_cpp.llama_model_meta_val_str_by_index(model, j, buf, len(buf))
        out[key] = buf.value.decode(errors="replace") if n >= 0 else ""
    return out


def _bools(text: str | None) -> list[bool] | None:
    if not text:
        return None
    try:
        return [bool(x) for x in json.loads(text)]
    except (ValueError, TypeError):
        return None


def effective(built, settings: dict[str, str]) -> dict:
    import gguf
    import llama_cpp

    from parity.adapters.llama_cpp.gguf_file import read_metadata

    m, spec = built.model, built.spec
    kv = meta(m)
    arch = kv["general.architecture"]
    family = {"gemma": 1, "gemma2": 2, "gemma3": 3, "gemma4": 4}[arch]
    L = llama_cpp.llama_model_n_layer(m)

    def num(key: str, default=None):
        v = kv.get(f"{arch}.{key}")
        return float(v) if v not in (None, "") else default

    # the sliding pattern: llama_model_meta_val_str prints arrays only by size, so it is read from the file the
    # model was loaded from (the same key), with the loader's period default (2 for Gemma 2, 6 for Gemma 3)
    md = read_metadata(built.path)
    pattern = md.get(f"{arch}.attention.sliding_window_pattern")
    n_swa = llama_cpp.llama_model_n_swa(m)
    if family == 1 or (family == 3 and not n_swa):
        local = [False] * L
    elif isinstance(pattern, list):
        local = [bool(x) for x in pattern]
    else:
        period = int(pattern) if pattern is not None else (2 if family == 2 else 6)
        local = [(i % period) < period - 1 for i in range(L)]
    base = num("rope.freq_base", 10000.0)
    base_swa = num("rope.freq_base_swa", base if family == 2 else 10000.0)  # llama-hparams.h: 10000
    scale = float(llama_cpp.llama_model_rope_freq_scale_train(m))
    attn_cap = num("attn_logit_softcapping", 50.0) if family == 2 else None
    # the loaders' default when the key is absent: 30 (llama-hparams.h) for Gemma 2 and 4 (gemma4.cpp reads it
    # optionally and applies it when non-zero), none for Gemma 3
    final_cap = num("final_logit_softcapping", 30.0 if family in (2, 4) else None) if family != 1 else None
    if final_cap == 0.0 and family == 4:
        final_cap = None
    reader = gguf.GGUFReader(str(built.path))
    names = {t.name: t for t in reader.tensors}
    stored = np.asarray(names["blk.0.attn_norm.weight"].data, np.float64)
    w = built.norm0.astype(np.float64)
    H, heads = llama_cpp.llama_model_n_embd(m), llama_cpp.llama_model_n_head(m)
    head_dim, n_kv, n_ff = int(num("attention.key_length")), llama_cpp.llama_model_n_head_kv(m), None
    extra = {}
    if family == 4:
        from parity.adapters.llama_cpp.gemma4 import readback as g4

        extra = g4(md, names, local, L, arch)
        # the spec's head_dim / num_kv_heads / intermediate_size are the local (and non-shared) layers'
        head_dim = int(num("attention.key_length_swa", head_dim))
        first_local = local.index(True) if True in local else 0
        n_kv = extra["kv_heads_per_layer"][first_local]
        n_ff = extra["mlp_width_per_layer"][0]
    q_scale = 1.0 if family == 4 else query_scale(_Shape(family, L, H, heads, head_dim))  # gemma4.cpp: 1.0
    return report({
        "vocab_size": int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m))),
        "hidden_size": H,
        "intermediate_size": n_ff if n_ff is not None else int(num("feed_forward_length")),
        "num_layers": L,
        "num_heads": heads,
        "num_kv_heads": n_kv,
        "head_dim": head_dim,
        "norm_unit_offset": bool(np.abs(stored - (1 + w)).max() < np.abs(stored - w).max()),
        "norm_placement": "sandwich" if "blk.0.post_attention_norm.weight" in names else "pre",
        "norm_eps": float(np.float32(num("attention.layer_norm_rms_epsilon"))),
        "final_norm": "output_norm.weight" in names,
        "gelu_approximate": "tanh",  # ggml_geglu_split: ggml's tanh-form GELU (through its float16 table)
        "geglu": "gate",  # build_ffn(..., LLM_FFN_GELU, LLM_FFN_PAR): gelu(ffn_gate) * ffn_up
        "embed_scale": float(np.sqrt(np.float32(H), dtype=np.float32)),
        "embed_scale_dtype": "activation",  # sqrtf(n_embd): a float32 constant on float32 activations
        "tied_head": "output.weight" not in names,
        "query_scale": [q_scale] * L,
        "rope_base": [base_swa if local[i] else base for i in range(L)],
        # the linear factor applies to the global layers only (rope_freq_scale_train_swa stays 1)
        "rope_scaling_factor": [1.0 if local[i] else 1.0 / scale for i in range(L)],
        "attn_softcap": [attn_cap] * L,
        "final_softcap": final_cap,
        "sliding_window": [n_swa if local[i] and n_swa else None for i in range(L)],
        "qk_norm": "blk.0.attn_q_norm.weight" in names,
    }, {
        "gguf": built.path.name,
        "architecture": arch,
        "settings": settings,
        "kv_cache_type": settings.get("kv_cache"),  # the declared cache type (parity.diagnose.decode reads it)
        "weight_types": sorted({str(t.tensor_type.name) for t in reader.tensors}),
        "metadata": {k: v for k, v in kv.items() if not k.startswith("tokenizer.")},
        "gelu_table": "ggml-cpu GGML_GELU_FP16: the GELU's input is rounded to float16 and its value read "
                      "from a float16 table, in float32 runs too",
        "desc": _desc(m),
        **extra,
    })


def query_scale(spec) -> float:
    """The query scale llama.cpp computes (it has no key for it): gemma2.cpp/gemma3.cpp take 1/sqrt(hidden /
    heads) for the 27B layer counts (46 / 62) and 1/sqrt(head_dim) otherwise; gemma.cpp always 1/sqrt(head_dim)."""
    big = {2: 46, 3: 62}.get(spec.family)
    d = spec.hidden_size // spec.num_heads if spec.num_layers == big else spec.head_dim
    return float(np.float32(1.0) / np.sqrt(np.float32(d)))


class _Shape:
    """The fields query_scale reads, from what llama.cpp loaded (not the spec)."""

    def __init__(self, family: int, L: int, H: int, heads: int, head_dim: int) -> None:
        self.family, self.num_layers, self.hidden_size, self.num_heads, self.head_dim = family, L, H, heads, head_dim


def _desc(model) -> str:
    import llama_cpp

    buf = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(model, buf, len(buf))
    return buf.value.decode(errors="replace")
