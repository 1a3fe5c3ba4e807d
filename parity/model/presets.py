"""Preset specs: the real Gemma shapes and tiny fixtures.

A table of plain dicts, each with the public config it came from, as litgpt
keeps its presets. Tiny fixtures keep the relationships that decide whether a
fault can show (see the comments on each).
"""

from __future__ import annotations

from pathlib import Path

from parity.errors import ParityInputError
from parity.model.spec import GemmaSpec, gemma_layer_types, load_config_json


def _gemma3_types(n: int) -> tuple[str, ...]:
    return gemma_layer_types(3, n)  # five local layers, then one global


def _gemma2_types(n: int) -> tuple[str, ...]:
    return gemma_layer_types(2, n)  # even layers local


_CONFIGS: list[dict] = [
    # ------------------------------------------------------------- Gemma 1
    dict(
        # https://huggingface.co/google/gemma-2b/blob/main/config.json
        name="gemma-2b", family=1, vocab_size=256_000, hidden_size=2048, intermediate_size=16_384,
        num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256, max_position=8192,
        rope_base=10_000.0, norm_eps=1e-6,
    ),
    dict(
        # https://huggingface.co/google/gemma-7b/blob/main/config.json
        # num_heads * head_dim = 4096 != hidden_size = 3072: head_dim is its own number
        name="gemma-7b", family=1, vocab_size=256_000, hidden_size=3072, intermediate_size=24_576,
        num_layers=28, num_heads=16, num_kv_heads=16, head_dim=256, max_position=8192,
        rope_base=10_000.0, norm_eps=1e-6,
    ),
    dict(
        # Tiny Gemma 1. sqrt(96) = 9.798 is not exact in bf16 (9.8125), so
        # embed-scale-dtype can show; heads * head_dim = 128 != 96 as in 7B;
        # 2 query heads per kv head so a wrong grouping shows.
        name="tiny-gemma", family=1, vocab_size=512, hidden_size=96, intermediate_size=256,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, max_position=512,
        rope_base=10_000.0, norm_eps=1e-6,
    ),
    # ------------------------------------------------------------- Gemma 2
    dict(
        # https://huggingface.co/google/gemma-2-2b/blob/main/config.json
        name="gemma2-2b", family=2, vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
        num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256, max_position=8192,
        norm_placement="sandwich", query_pre_attn_scalar=256, attn_softcap=50.0, final_softcap=30.0,
        sliding_window=4096, layer_types=_gemma2_types(26),
    ),
    dict(
        # https://huggingface.co/google/gemma-2-9b/blob/main/config.json
        name="gemma2-9b", family=2, vocab_size=256_000, hidden_size=3584, intermediate_size=14_336,
        num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256, max_position=8192,
        norm_placement="sandwich", query_pre_attn_scalar=256, attn_softcap=50.0, final_softcap=30.0,
        sliding_window=4096, layer_types=_gemma2_types(42),
    ),
    dict(
        # https://huggingface.co/google/gemma-2-27b/blob/main/config.json
        # query_pre_attn_scalar = hidden / heads = 144, not head_dim = 128
        name="gemma2-27b", family=2, vocab_size=256_000, hidden_size=4608, intermediate_size=36_864,
        num_layers=46, num_heads=32, num_kv_heads=16, head_dim=128, max_position=8192,
        norm_placement="sandwich", query_pre_attn_scalar=144, attn_softcap=50.0, final_softcap=30.0,
        sliding_window=4096, layer_types=_gemma2_types(46),
    ),
    dict(
        # Tiny Gemma 2 (2B/9B relationships): even layers local; window 16 < the
        # long prompt; query_pre_attn_scalar = head_dim as in 2B and 9B; softcaps
        # lowered so the random activations reach them (scores ~3, logits ~4).
        name="tiny-gemma2", family=2, vocab_size=512, hidden_size=96, intermediate_size=256,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, max_position=512,
        norm_placement="sandwich", query_pre_attn_scalar=32, attn_softcap=5.0, final_softcap=3.0,
        sliding_window=16, layer_types=_gemma2_types(4),
    ),
    dict(
        # Tiny Gemma 2 with 27B's relationship: query_pre_attn_scalar (48) is
        # hidden / heads (= 144 for 27B), not head_dim (32; 128 for 27B).
        name="tiny-gemma2-27b", family=2, vocab_size=512, hidden_size=192, intermediate_size=512,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, max_position=512,
        norm_placement="sandwich", query_pre_attn_scalar=48, attn_softcap=5.0, final_softcap=3.0,
        sliding_window=16, layer_types=_gemma2_types(4),
    ),
    # ------------------------------------------------------------- Gemma 3 (text)
    dict(
        # https://huggingface.co/google/gemma-3-1b-pt/blob/main/config.json
        name="gemma3-1b", family=3, vocab_size=262_144, hidden_size=1152, intermediate_size=6912,
        num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, max_position=32_768,
        norm_placement="sandwich", query_pre_attn_scalar=256, sliding_window=512,
        layer_types=_gemma3_types(26), qk_norm=True, rope_base=1_000_000.0, rope_local_base=10_000.0,
    ),
    dict(
        # https://huggingface.co/google/gemma-3-4b-pt/blob/main/config.json (text_config)
        name="gemma3-4b", family=3, vocab_size=262_208, hidden_size=2560, intermediate_size=10_240,
        num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256, max_position=131_072,
        norm_placement="sandwich", query_pre_attn_scalar=256, sliding_window=1024,
        layer_types=_gemma3_types(34), qk_norm=True, rope_base=1_000_000.0, rope_local_base=10_000.0,
        rope_scaling_factor=8.0,
    ),
    dict(
        # https://huggingface.co/google/gemma-3-12b-pt/blob/main/config.json (text_config)
        name="gemma3-12b", family=3, vocab_size=262_208, hidden_size=3840, intermediate_size=15_360,
        num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256, max_position=131_072,
        norm_placement="sandwich", query_pre_attn_scalar=256, sliding_window=1024,
        layer_types=_gemma3_types(48), qk_norm=True, rope_base=1_000_000.0, rope_local_base=10_000.0,
        rope_scaling_factor=8.0,
    ),
    dict(
        # https://huggingface.co/google/gemma-3-27b-pt/blob/main/config.json (text_config)
        name="gemma3-27b", family=3, vocab_size=262_208, hidden_size=5376, intermediate_size=21_504,
        num_layers=62, num_heads=32, num_kv_heads=16, head_dim=128, max_position=131_072,
        norm_placement="sandwich", query_pre_attn_scalar=168, sliding_window=1024,
        layer_types=_gemma3_types(62), qk_norm=True, rope_base=1_000_000.0, rope_local_base=10_000.0,
        rope_scaling_factor=8.0,
    ),
    dict(
        # Tiny Gemma 3: six layers so the 5-local:1-global ratio holds once;
        # window 16 < the long prompt; linear rope factor 8 as 4B+.
        name="tiny-gemma3", family=3, vocab_size=512, hidden_size=96, intermediate_size=256,
        num_layers=6, num_heads=4, num_kv_heads=2, head_dim=32, max_position=512,
        norm_placement="sandwich", query_pre_attn_scalar=32, sliding_window=16,
        layer_types=_gemma3_types(6), qk_norm=True, rope_base=1_000_000.0, rope_local_base=10_000.0,
        rope_scaling_factor=8.0,
    ),
]

# ------------------------------------------------------------- Gemma 4 (text; docs/gemma4.md)
# Shared by every Gemma 4 shape: no unit offset, sandwich norms, q/k/v norms, scale 1.0, layer scalar,
# proportional RoPE (0.25) on global layers at theta 1e6, plain RoPE at 1e4 on local ones, softcap 30.
_GEMMA4 = dict(
    family=4, norm_unit_offset=False, norm_placement="sandwich", qk_norm=True, v_norm=True, layer_scalar=True,
    query_pre_attn_scalar=1.0, final_softcap=30.0, rope_base=1_000_000.0, rope_local_base=10_000.0,
    rope_proportion=0.25, global_head_dim=512, head_dim=256, vocab_size=262_144, norm_eps=1e-6,
)


def _gemma4_types(n: int, period: int) -> tuple[str, ...]:
    return gemma_layer_types(3, n, period)  # period - 1 local layers, then one global; the last is global


_CONFIGS += [
    dict(
        # GEMMA4.md section 6 (google/gemma-4-E2B config.json, JAX _gemma4.py): 20 KV-shared layers read layer 13
        # (local) and 14 (global); the MLP is twice as wide (12288) on those 20 layers
        _GEMMA4, name="gemma-4-e2b", hidden_size=1536, intermediate_size=6144, num_layers=35, num_heads=8,
        num_kv_heads=1, max_position=131_072, sliding_window=512, layer_types=_gemma4_types(35, 5),
        ple_dim=256, num_kv_shared_layers=20, double_wide_mlp=True,
    ),
    dict(
        # GEMMA4.md section 6 (google/gemma-4-E4B): 18 KV-shared layers read layer 22 (local) and 23 (global)
        _GEMMA4, name="gemma-4-e4b", hidden_size=2560, intermediate_size=10_240, num_layers=42, num_heads=8,
        num_kv_heads=2, max_position=131_072, sliding_window=512, layer_types=_gemma4_types(42, 6),
        ple_dim=256, num_kv_shared_layers=18,
    ),
    dict(
        # GEMMA4.md section 6 (google/gemma-4-26B-A4B): every layer a dense MLP (2112) beside 128 experts of 704,
        # top 8; K=V on global layers with 2 KV heads there
        _GEMMA4, name="gemma-4-26b-a4b", hidden_size=2816, intermediate_size=2112, num_layers=30, num_heads=16,
        num_kv_heads=8, num_global_kv_heads=2, attention_k_eq_v=True, max_position=262_144, sliding_window=1024,
        layer_types=_gemma4_types(30, 6), num_experts=128, top_k_experts=8, expert_intermediate_size=704,
    ),
    dict(
        # GEMMA4.md section 6 (google/gemma-4-31B): dense, K=V on global layers with 4 KV heads there
        _GEMMA4, name="gemma-4-31b", hidden_size=5376, intermediate_size=21_504, num_layers=60, num_heads=32,
        num_kv_heads=16, num_global_kv_heads=4, attention_k_eq_v=True, max_position=262_144, sliding_window=1024,
        layer_types=_gemma4_types(60, 6),
    ),
    dict(
        # Tiny Gemma 4, E-model style: per-layer embeddings (16 wide), the last 2 layers KV-shared with a
        # double-wide MLP, local head 32 / global head 64 (proportional RoPE turns 8 of its 32 pairs), window
        # 16 < the long prompt. Layers LLLGLG: the shared local layer 4 reads layer 2 and the shared global layer
        # 5 reads layer 3, where HF's last-of-type rule and JAX's positional rule agree. Softcap 5 so the
        # random logits (~4) reach it.
        _GEMMA4, name="tiny-gemma4", vocab_size=512, hidden_size=96, intermediate_size=128, num_layers=6,
        num_heads=4, num_kv_heads=2, head_dim=32, global_head_dim=64, max_position=512, sliding_window=16,
        layer_types=("local", "local", "local", "global", "local", "global"), final_softcap=5.0,
        ple_dim=16, num_kv_shared_layers=2, double_wide_mlp=True,
    ),
    dict(
        # Tiny Gemma 4, 26B style: 8 experts of 32, top 2, beside a dense MLP of 64; K=V on the two global layers
        # with 1 KV head there (2 on local ones); no per-layer embeddings or KV sharing.
        _GEMMA4, name="tiny-gemma4-moe", vocab_size=512, hidden_size=96, intermediate_size=64, num_layers=6,
        num_heads=4, num_kv_heads=2, head_dim=32, global_head_dim=64, num_global_kv_heads=1,
        attention_k_eq_v=True, max_position=512, sliding_window=16,
        layer_types=("local", "local", "global", "local", "local", "global"), final_softcap=5.0,
        num_experts=8, top_k_experts=2, expert_intermediate_size=32,
    ),
]

PRESETS: dict[str, GemmaSpec] = {c["name"]: GemmaSpec(**c) for c in _CONFIGS}
DEFAULT_PRESET = "tiny-gemma"


def resolve_spec(text: str | None) -> GemmaSpec:
    """--spec: a preset name, or a path to a config.json (or its directory)."""
    if text is None:
        return PRESETS[DEFAULT_PRESET]
    if text in PRESETS:
        return PRESETS[text]
    if text.endswith(".json") or "/" in text or Path(text).exists():
        return load_config_json(text)
    raise ParityInputError(
        f"unknown spec {text!r}; use a preset ({', '.join(sorted(PRESETS))}) or a path to config.json"
    )
