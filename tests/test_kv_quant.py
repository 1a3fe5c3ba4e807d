"""Quantized KV caches as honest rounding: llama.cpp's q4_0/q5_0 caches (flash attention) and mlx-lm's
QuantizedKVCache (mx.quantize affine groups), each measured against the runtime itself.

Measured here: the cache each runtime holds is parity.numerics.act_quant's kind applied to the keys and values a
float cache holds, bit for bit (layer 0, where both runs computed the same K and V); a correct run with the
cache's rounding declared (Held.kv) PASSes, and the same run with it undeclared FAILs at layer 0's attention.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from parity.model.presets import resolve_spec
from parity.model.weights import random_weights
from parity.numerics.act_quant import act_quant, query_kind, round_rows
from parity.report.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")
PROMPT, CONT = list(range(1, 9)), [9, 10]
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf")
                                 is None, reason="llama-cpp needs pip install 'parity[llama-cpp]'")
needs_mlx = pytest.mark.skipif(importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None,
                               reason="mlx needs pip install 'parity[mlx]'")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("PARITY_CACHE", str(tmp_path_factory.mktemp("kvq-cache")))
    yield tmp_path_factory
    mp.undo()


def _run(env, spec: str, impl: str, *extra: str) -> tuple[int, dict]:
    out = env.mktemp("report")
    rc = main(["--spec", spec, "--impls", impl, "--dtypes", "float32", "--out", str(out), *extra])
    return rc, json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------ the kinds themselves
def test_ggml_q4_0_truncates_where_a_rounding_would_not():
    """quantize_row_q4_0_ref takes (int8)(x / d + 8.5), that is floor(x / d + 0.5): halves go up in x / d, so
    2.5 -> 3 but -2.5 -> -2 and -0.5 -> 0 (neither half away from zero nor half to even)."""
    x = np.zeros(32, np.float32)
    x[:5] = -8.0, 2.5, -2.5, 0.5, -0.5  # block max -8: d = -8 / -8 = 1, x / d = x
    got = round_rows(x[None], "q4_0")[0]
    assert got[:5].tolist() == [-8.0, 3.0, -2.0, 1.0, 0.0], got[:5]


def test_kinds_name_the_query_they_read_with():
    assert query_kind("q4_0-x86") == "q8_0-x86" and query_kind("q5_0") == "q8_0"
    assert query_kind("f16") == "f16" and query_kind("q8_0") == "q8_0"
    assert query_kind("affine4/64") is None and act_quant("affine8/32-bf16").fmt == "bfloat16"
    with pytest.raises(ValueError, match="affine<bits>/<group>"):
        act_quant("affine7/64")


# ------------------------------------------------------------------ llama.cpp
@needs_llama
@pytest.mark.parametrize("kv", ["q4_0", "q5_0"])
def test_llama_cpp_cache_is_the_kind_bit_for_bit(env, kv):
    """Layer 0's K and V as llama.cpp's q4_0/q5_0 cache holds them (read back and dequantized) equal the kind
    applied to what its F32 cache holds (the same keys: nothing before layer 0's cache depends on its type)."""
    from parity.adapters.llama_cpp import LlamaCppAdapter
    from parity.adapters.llama_cpp.adapter import _kv_kind

    spec = resolve_spec("tiny-gemma2")
    w = random_weights(spec, 0)
    flt, qnt = (LlamaCppAdapter(kv_type=t, flash_attn="on") for t in ("f32", kv))
    ref = flt.decode(flt.build(spec, w, "float32"), PROMPT, CONT).steps[-1].cache[0]
    got = qnt.decode(qnt.build(spec, w, "float32"), PROMPT, CONT).steps[-1].cache[0]
    kind = _kv_kind(kv)
    assert np.array_equal(round_rows(ref.k, kind), got.k) and np.array_equal(round_rows(ref.v, kind), got.v)
    assert not np.array_equal(ref.k, got.k)  # (ties of x / d do not occur on these keys: the unit test above)


@needs_llama
def test_llama_cpp_q4_0_cache_passes_declared(env):
    """q8_0 weights, a q4_0 cache (flash attention), prefill and decode: PASS with the rounding declared."""
    rc, r = _run(env, "tiny-gemma2", "llama-cpp-q8_0", "--kv-cache", "q4_0", "--flash-attn", "on",
                 "--quant-budget", "1", "--decode", "auto")
    assert rc == 0 and r["status"] == "PASS", r["headline"]
    assert r["runs"][0]["settings"]["kv_rounding"].startswith("q4_0")
    modes = {v["mode"]: v["status"] for v in r["verdicts"]}
    assert modes.get("decode") == "PASS", modes


def undeclared_q4_0_cache():
    """--impls factory: q8_0 weights and a q4_0 cache, the cache's rounding not declared (Held.kv None)."""
    import dataclasses

    from parity.adapters.llama_cpp import LlamaCppAdapter

    class Undeclared(LlamaCppAdapter):
        def held(self, spec, weights, dtype):
            return dataclasses.replace(super().held(spec, weights, dtype), kv=None)

    return Undeclared(weights="q8_0", kv_type="q4_0", flash_attn="on")


@needs_llama
def test_llama_cpp_q4_0_cache_undeclared_fails_at_attention(env):
    rc, r = _run(env, "tiny-gemma2", f"{__name__}:undeclared_q4_0_cache", "--quant-budget", "1")
    assert rc == 1 and r["first_divergence"]["tap"].startswith("layers.0.attn"), r["headline"]


# ------------------------------------------------------------------ mlx-lm
def mlx_kv4():
    """--impls factory: mlx-lm with a 4-bit QuantizedKVCache in groups of 32 (tiny head_dim is 32)."""
    from parity.adapters.mlx import MlxAdapter

    return MlxAdapter(kv_bits=4, kv_group_size=32)


def undeclared_mlx_kv4():
    """--impls factory: the same, its cache's rounding not declared (held() says nothing)."""
    from parity.adapters.mlx import MlxAdapter

    class Undeclared(MlxAdapter):
        def held(self, spec, weights, dtype):
            return None

    return Undeclared(kv_bits=4, kv_group_size=32)


@needs_mlx
@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_quantized_cache_is_the_kind_bit_for_bit(bits):
    """Layer 0's K and V as mlx-lm's QuantizedKVCache holds them (mx.dequantize of its tuples) equal the affine
    kind applied to what its float KVCache holds after the same decode."""
    from parity.adapters.mlx import MlxAdapter
    from parity.numerics.act_quant import affine_kind

    spec = resolve_spec("tiny-gemma")
    w = random_weights(spec, 0)
    flt, qnt = MlxAdapter(), MlxAdapter(kv_bits=bits, kv_group_size=32)
    qnt.check(spec, "float32")
    ref = flt.decode(flt.build(spec, w, "float32"), PROMPT, CONT).steps[-1].cache[0]
    got = qnt.decode(qnt.build(spec, w, "float32"), PROMPT, CONT).steps[-1].cache[0]
    assert np.array_equal(ref.positions, got.positions)
    kind = affine_kind(bits, 32)
    assert np.array_equal(round_rows(ref.k, kind), got.k) and np.array_equal(round_rows(ref.v, kind), got.v)
    assert not np.array_equal(ref.k, got.k)


def _exact_gelu_gemma(env) -> str:
    """tiny-gemma with the exact GELU mlx-lm's Gemma 1 runs (nn.gelu), as a config file: a run that can PASS."""
    import dataclasses

    from parity.model.spec import to_hf_config

    spec = dataclasses.replace(resolve_spec("tiny-gemma"), gelu_approximate="none", name="tiny-gemma-exact-gelu")
    cfg = to_hf_config(spec)
    cfg.pop("parity", None)
    path = env.mktemp("spec") / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@needs_mlx
def test_mlx_quantized_cache_passes_declared(env):
    """Every tap of prefill and decode within its honest bound, and the run PASSes: the GELU probe judges the
    exact GELU the spec asks for as correct (it once named gelu-exact whatever the spec said)."""
    rc, r = _run(env, _exact_gelu_gemma(env), f"{__name__}:mlx_kv4", "--decode", "auto")
    assert all(v["first_divergence"] is None for v in r["verdicts"]), r["headline"]
    assert rc == 0 and r["status"] == "PASS", r["headline"]
    assert r["runs"][0]["settings"]["kv_rounding"] == "affine4/32"
    assert {v["mode"]: v["status"] for v in r["verdicts"]}.get("decode") == "PASS"


@needs_mlx
def test_mlx_quantized_cache_undeclared_fails_at_attention(env):
    rc, r = _run(env, _exact_gelu_gemma(env), f"{__name__}:undeclared_mlx_kv4")
    assert rc == 1 and r["first_divergence"]["tap"].startswith("layers.0.attn"), r["headline"]


@needs_mlx
def test_mlx_kv_bits_refusals():
    from parity.adapters.mlx import MlxAdapter
    from parity.errors import ParityInputError, Unsupported

    with pytest.raises(ParityInputError, match="kv_group_size 64"):
        MlxAdapter(kv_bits=4).check(resolve_spec("tiny-gemma"), "float32")
    with pytest.raises(Unsupported, match="RotatingKVCache"):
        MlxAdapter(kv_bits=4, kv_group_size=32).check(resolve_spec("tiny-gemma3"), "float32")
    with pytest.raises(ParityInputError, match="kv_bits"):
        MlxAdapter(kv_bits=7)
