"""Gemma 4 through llama.cpp's `src/models/gemma4.cpp` (vendored in llama-cpp-python 0.3.36): what it cannot
build, its graph node names for parity's taps, and which layer's cache a KV-shared layer reads.

What gemma4.cpp computes (read from its source; checked against the port by tests/test_llama_cpp_gemma4.py):
- norms multiply by the stored weight (no unit offset: the converter folds none); v is `ggml_rms_norm` (no
  weight); the attention scale is hard-coded 1.0 (`f_attention_scale`), no attention softcap; K=V where a global
  layer has no `attn_v` (`Vcur = Kcur` before the norms); proportional RoPE through the `rope_freqs` factors.
- the MoE router is `rms_norm(attn_out) / sqrt(n_embd) * ffn_gate_inp.scale` then `ffn_gate_inp`; softmax over
  all experts (`ffn_moe_probs`), top k (`ffn_moe_topk`, int32), renormalised (`ffn_moe_weights_norm`); the
  per-expert scale multiplies each expert's down projection (`ffn_down_exps.scale`).
- KV sharing (llama-model.cpp `create_memory`, the `reuse` callback for LLM_ARCH_GEMMA4) is positional: with
  n = block_count - shared_kv_layers, a shared local layer reads layer n - 2 and a shared global one n - 1 (the
  JAX rule, GEMMA4.md "KV sharing"), not parity's / transformers' last non-shared layer of the same type.
- per-layer embeddings: rows are indexed by the token id over the whole vocabulary (`get_rows` on a table of
  n_vocab rows): there is no separate per-layer vocabulary.
"""

from __future__ import annotations

import numpy as np

from parity.errors import Unsupported

# canonical tap (layer i) -> gemma4.cpp node name (cb names), dense layers
LAYER_TAPS = {
    "attn_norm": "attn_norm-{i}", "attn": "@wo-{i}", "post_attn_norm": "attn_post_norm-{i}",
    "attn_residual": "attn_out-{i}", "mlp_norm": "ffn_norm-{i}", "mlp.gate": "ffn_gate-{i}",
    "mlp.up": "ffn_up-{i}", "mlp.hidden": "ffn_geglu-{i}", "mlp": "ffn_out-{i}",
    "post_mlp_norm": "ffn_post_norm-{i}", "out": "l_out-{i}",
}
# MoE layers: the dense MLP's norm and output are named apart (gemma4.cpp's is_moe_layer branch)
MOE_LAYER_TAPS = {
    "mlp_norm": "ffn_norm_1-{i}", "mlp": "@ffn_down-{i}", "dense_branch": "ffn_mlp-{i}",
    "moe.router_logits": "ffn_moe_logits-{i}", "moe.router_probs": "ffn_moe_probs-{i}",
    "moe.experts": "ffn_moe_topk-{i}", "moe.weights": "ffn_moe_weights_norm-{i}", "moe_branch": "ffn_moe-{i}",
}
PLE_TAPS = {"ple": "per_layer_embd_out-{i}"}
DENSE_DOWN = "@ffn_down-{i}"  # the dense down projection's MUL_MAT on a MoE layer (unnamed: found by its weight)
PRE_SCALAR = "@pre_scalar-{i}"  # the residual add the layer scalar multiplies (unnamed: found by its operands)
PER_LAYER_INPUT = "inp_per_layer"  # [T, L, P] before the permute: layer i's slice is [:, i, :]
SCORES = "kq-{i}"
WANT = {"inp_scaled", "result_norm", "result_output", "kq_soft_max", PER_LAYER_INPUT,
        *(v.split("-")[0] for v in (*LAYER_TAPS.values(), *MOE_LAYER_TAPS.values(), *PLE_TAPS.values(), SCORES))}

NO_CACHE = ("llama.cpp's KV-shared layer {i} has no cache of its own: it reads layer {j}'s (llama-model.cpp's "
            "reuse callback)")


# what gemma4.cpp hard-codes (the adapter's check refuses any other value, as for Gemma 1-3's graphs)
FIXED = {"norm_placement": "sandwich", "qk_norm": True, "v_norm": True, "query_pre_attn_scalar": 1.0,
         "attn_softcap": None, "gelu_approximate": "tanh", "embed_scale": True, "tied_head": True}


def check(spec, name: str) -> None:
    """Raise Unsupported naming the first spec feature gemma4.cpp / its GGUF keys cannot express beyond FIXED."""
    if "local" not in spec.layer_types or not spec.sliding_window:
        raise Unsupported(f"{name}: llama.cpp's Gemma 4 always builds an iSWA cache and needs at least one local "
                          "layer with a sliding_window; drop it from --impls for this spec")
    if spec.ple_dim and spec.ple_rows != spec.vocab_size:
        raise Unsupported(f"{name}: ple_vocab_size={spec.ple_vocab_size} differs from vocab_size="
                          f"{spec.vocab_size}; llama.cpp's per-layer table has one row per token id (no separate "
                          "per-layer vocabulary); drop it from --impls for this spec")
    if spec.num_global_kv_heads and spec.num_kv_heads != spec.num_global_kv_heads and not spec.attention_k_eq_v:
        raise Unsupported(f"{name}: num_global_kv_heads without K=V is not a Gemma 4 model llama.cpp converts")
    for i in range(spec.first_kv_shared, spec.num_layers):
        got, want = kv_source(spec, i), spec.kv_source(i)
        if got != want:
            raise Unsupported(f"{name}: KV-shared layer {i} reads layer {want} (the last non-shared layer of its "
                              f"type); llama.cpp's positional rule reads layer {got}; drop it from --impls for this "
                              "spec (layouts where both agree: layer n-1 global, n-2 local)")
    if spec.num_kv_shared_layers and spec.first_kv_shared < 2:
        raise Unsupported(f"{name}: llama.cpp needs at least 2 layers with their own KV before the shared ones")


def kv_source(spec, layer: int, n_kv: int | None = None, local: list[bool] | None = None) -> int:
    """The layer whose cache llama.cpp's `layer` reads: itself below n_kv (block_count - shared_kv_layers),
    else n_kv - 2 (local) or n_kv - 1 (global). `n_kv`/`local` as loaded (readback), or from the spec."""
    n = spec.first_kv_shared if n_kv is None else n_kv
    is_local = (spec.layer_types[layer] == "local") if local is None else local[layer]
    return layer if layer < n else n - (2 if is_local else 1)


def layer_taps(spec, i: int) -> dict[str, str]:
    table = dict(LAYER_TAPS)
    if spec.num_experts:
        table.update(MOE_LAYER_TAPS)
    if spec.ple_dim:
        table.update(PLE_TAPS)
    if spec.layer_scalar:
        table["pre_scalar"] = PRE_SCALAR
    return {tap: node.format(i=i) for tap, node in table.items()}


def pre_scalar_layer(spec, src_names: list[str]) -> int | None:
    """The layer whose pre-scalar residual this node is, from its operands' names: the add of the PLE branch
    (`pe_in + per_layer_embd_out-i`), or without PLE the add of `ffn_post_norm-i` and the residual."""
    if not spec.layer_scalar:
        return None
    prefix, at = ("per_layer_embd_out-", 1) if spec.ple_dim else ("ffn_post_norm-", 0)
    name = src_names[at] if len(src_names) > at else ""
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def readback(md: dict, names: dict, local: list[bool], L: int, arch: str) -> dict:
    """Gemma 4's structure as the file llama.cpp loaded holds it (library facts): per-layer head sizes, KV
    heads and MLP widths (scalar keys broadcast as the loader does), which layers have their own K/V (and K=V:
    no attn_v), the RoPE share the rope_freqs factors rotate, the PLE width, the experts, the layer scalar,
    and which layer's cache each KV-shared layer reads by llama.cpp's rule."""
    def per_layer(key: str, default):
        v = md.get(f"{arch}.{key}", default)
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * L

    hd_full = int(md[f"{arch}.attention.key_length"])
    hd_swa = int(md.get(f"{arch}.attention.key_length_swa", hd_full))
    n_kv = L - int(md.get(f"{arch}.attention.shared_kv_layers", 0))
    own = [i < n_kv for i in range(L)]
    freqs = names.get("rope_freqs.weight")
    rotated = int((np.asarray(freqs.data, np.float32) == 1.0).sum()) if freqs is not None else None
    n_exp = int(md.get(f"{arch}.expert_count", 0))
    return {
        "head_dim_per_layer": [hd_swa if local[i] else hd_full for i in range(L)],
        "kv_heads_per_layer": per_layer("attention.head_count_kv", md.get(f"{arch}.attention.head_count")),
        "own_kv": own,
        "k_eq_v": [own[i] and f"blk.{i}.attn_v.weight" not in names for i in range(L)],
        "mlp_width_per_layer": per_layer("feed_forward_length", 0),
        "rope_proportion_global": (rotated / (hd_full // 2)) if rotated is not None else None,
        "ple_dim": int(md.get(f"{arch}.embedding_length_per_layer_input", 0)),
        "layer_scalar": "blk.0.layer_output_scale.weight" in names,
        "v_norm": "ggml_rms_norm without a weight (hard-coded in gemma4.cpp)",
        "experts": ({"num_experts": n_exp, "top_k": int(md[f"{arch}.expert_used_count"]),
                     "expert_width": int(md[f"{arch}.expert_feed_forward_length"])} if n_exp else None),
        "kv_source": {str(i): n_kv - (2 if local[i] else 1) for i in range(n_kv, L)},
    }
