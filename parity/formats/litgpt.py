"""litgpt's fused q/k/v projection, both ways: numpy only, shared by the port, the litgpt adapter and checkpoints.

Two layouts of the fused weight's rows exist:

* "grouped" (litgpt 0.4.x `attn.attn`, and the port): per kv group, that
  group's query heads, then its key head, then its value head;
* "stacked" (litgpt 0.5.x `attn.qkv`, as its convert_hf_checkpoint writes):
  a plain [Q; K; V]. The port loaded this way is the qkv-order fault, wrong
  whenever num_kv_heads > 1.

Both are one row plan (`qkv_rows`), so fusing and splitting cannot disagree.
"""

from __future__ import annotations

import numpy as np

from parity.errors import ParityInputError
from parity.model.spec import GemmaSpec

LAYOUTS = ("grouped", "stacked")
# the canonical name of the fused tensor, which the adapters' name maps carry to litgpt's
FUSED = "model.layers.{}.self_attn.qkv.weight"
# litgpt's parameter for each layout: 0.4.x names the fused projection attn.attn, 0.5.x attn.qkv
QKV_TARGET = {"stacked": "transformer.h.{}.attn.qkv.weight", "grouped": "transformer.h.{}.attn.attn.weight"}
LAYOUT_OF = {target: layout for layout, target in QKV_TARGET.items()}


def qkv_rows(spec: GemmaSpec, layout: str) -> list[tuple[str, int, int]]:
    """The fused weight's rows in order: ("q" | "k" | "v", first row in that projection, row count)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown qkv layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    hd, kv = spec.head_dim, spec.num_kv_heads
    g = spec.num_heads // kv
    if layout == "stacked":
        return [("q", 0, spec.num_heads * hd), ("k", 0, kv * hd), ("v", 0, kv * hd)]
    rows = []
    for group in range(kv):  # q_proj's rows are heads x head_dim, group-major
        rows += [("q", group * g * hd, g * hd), ("k", group * hd, hd), ("v", group * hd, hd)]
    return rows


def fuse(q: np.ndarray, k: np.ndarray, v: np.ndarray, spec: GemmaSpec, layout: str) -> np.ndarray:
    """One layer's q, k, v projections as litgpt's fused weight."""
    src = {"q": q, "k": k, "v": v}
    return np.concatenate([src[w][r:r + n] for w, r, n in qkv_rows(spec, layout)], axis=0)


def split(fused: np.ndarray, spec: GemmaSpec, layout: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of `fuse`: one layer's (q, k, v), each contiguous."""
    hd, kv = spec.head_dim, spec.num_kv_heads
    out = {"q": np.empty((spec.num_heads * hd,) + fused.shape[1:], fused.dtype),
           "k": np.empty((kv * hd,) + fused.shape[1:], fused.dtype),
           "v": np.empty((kv * hd,) + fused.shape[1:], fused.dtype)}
    row = 0
    for w, r, n in qkv_rows(spec, layout):
        out[w][r:r + n] = fused[row:row + n]
        row += n
    return out["q"], out["k"], out["v"]


def fuse_qkv(tensors: dict[str, np.ndarray], spec: GemmaSpec, layout: str) -> dict[str, np.ndarray]:
    """Canonical tensors with each layer's q, k, v replaced by the fused weight (each used exactly once)."""
    out = dict(tensors)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}.self_attn."
        q, k, v = (out.pop(p + n + "_proj.weight") for n in "qkv")
        out[FUSED.format(i)] = fuse(q, k, v, spec, layout)
    return out


def split_qkv(tensors: dict[str, np.ndarray], spec: GemmaSpec, layout: str, where: str) -> None:
    """The inverse of `fuse_qkv`, in place; a fused weight of the wrong shape is bad input naming `where`."""
    want = ((spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim, spec.hidden_size)
    for i in range(spec.num_layers):
        fused = tensors.pop(FUSED.format(i), None)
        if fused is None:
            continue  # check_tensors names the missing q/k/v
        if fused.shape != want:
            raise ParityInputError(f"{where}: layer {i}'s fused qkv has shape {fused.shape}, the config needs "
                                   f"{want}; the weights and model_config.yaml disagree")
        for n, t in zip("qkv", split(fused, spec, layout)):
            tensors[f"model.layers.{i}.self_attn.{n}_proj.weight"] = t


# canonical (HF) name -> litgpt parameter name; `{}` is the layer index.
# `self_attn.qkv.weight` is the fused tensor `litgpt_format.fuse_qkv` makes from q, k and v.
# `lm_head.weight`, when the head is tied, is the embedding, added the way
# litgpt's convert_hf_checkpoint adds it (litgpt's lm_head is its own parameter).
NAME_MAP_PRE = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.layers.{}.input_layernorm.weight": "transformer.h.{}.norm_1.weight",
    "model.layers.{}.self_attn.qkv.weight": "transformer.h.{}.attn.qkv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "transformer.h.{}.attn.proj.weight",
    "model.layers.{}.self_attn.q_norm.weight": "transformer.h.{}.attn.norm_q.weight",
    "model.layers.{}.self_attn.k_norm.weight": "transformer.h.{}.attn.norm_k.weight",
    "model.layers.{}.post_attention_layernorm.weight": "transformer.h.{}.norm_2.weight",  # Gemma 1: the pre-MLP norm
    "model.layers.{}.mlp.gate_proj.weight": "transformer.h.{}.mlp.fc_1.weight",
    "model.layers.{}.mlp.up_proj.weight": "transformer.h.{}.mlp.fc_2.weight",
    "model.layers.{}.mlp.down_proj.weight": "transformer.h.{}.mlp.proj.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
NAME_MAP_SANDWICH = {
    **NAME_MAP_PRE,
    "model.layers.{}.post_attention_layernorm.weight": "transformer.h.{}.post_attention_norm.weight",  # after attn
    "model.layers.{}.pre_feedforward_layernorm.weight": "transformer.h.{}.norm_2.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "transformer.h.{}.post_mlp_norm.weight",
}
