"""Gemma 4 through llama.cpp's own gemma4.cpp (llama-cpp-python 0.3.36), from the GGUF parity writes as
conversion/gemma.py's Gemma4Model would: tiny-gemma4 (PLE, KV sharing, double-wide MLP, proportional RoPE) and
tiny-gemma4-moe (experts beside the dense MLP, K=V) against the float64 port, tap by tap, prefill and decode
through its iSWA caches past the window; q8_0 through its held weights; a wrong GGUF key (RoPE bases swapped) found.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("llama-cpp needs pip install 'parity[llama-cpp]'", allow_module_level=True)

from parity.errors import Unsupported  # noqa: E402
from parity.model.presets import PRESETS  # noqa: E402
from parity.model.weights import random_weights  # noqa: E402
from parity.report.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("PARITY_CACHE", str(tmp_path_factory.mktemp("llama-cache")))
    yield tmp_path_factory
    mp.undo()


def _run(env, spec: str, impl: str, *extra: str) -> tuple[int, dict]:
    out = env.mktemp("report")
    rc = main(["--spec", spec, "--impls", impl, "--dtypes", "float32", "--out", str(out), *extra])
    return rc, json.loads((out / "report.json").read_text())


def _not_compared(r: dict) -> set[str]:
    return {t.split(" ")[0] for v in r["verdicts"] for t in v.get("not_compared", {})}


@pytest.mark.parametrize("preset", ["tiny-gemma4", "tiny-gemma4-moe"])
def test_float32_prefill_passes_every_tap(env, preset):
    """Default settings (F16 KV cache): every tap gemma4.cpp computes is compared and within the honest bound,
    the Gemma 4 taps included (per-layer inputs, PLE branch, pre-scalar residual, router, experts)."""
    rc, r = _run(env, preset, "llama-cpp")
    assert rc == 0 and r["status"] == "PASS", r["headline"]
    assert _not_compared(r) <= {"rope.cos", "layers.*.mlp.act"} | {f"layers.{i}.mlp.act" for i in range(6)}
    eff, ref = r["effective"]["llama-cpp@float32"], r["effective"]["litgpt-style@float64"]
    for p in ("norm_unit_offset", "query_scale", "rope_base", "rope_scaling_factor", "final_softcap",
              "sliding_window", "qk_norm", "tied_head", "head_dim", "num_kv_heads", "intermediate_size"):
        assert eff[p] == pytest.approx(ref[p]), p
    lib, spec = eff["library"], PRESETS[preset]
    assert lib["architecture"] == "gemma4"
    assert lib["head_dim_per_layer"] == [spec.head_dim_for(i) for i in range(6)]
    assert lib["kv_heads_per_layer"] == [spec.kv_heads_for(i) for i in range(6)]
    assert lib["mlp_width_per_layer"] == [spec.mlp_width_for(i) for i in range(6)]
    assert lib["k_eq_v"] == [spec.k_eq_v_for(i) for i in range(6)]
    assert lib["rope_proportion_global"] == spec.rope_proportion
    assert lib["kv_source"] == {str(i): spec.kv_source(i) for i in range(spec.first_kv_shared, 6)}


def test_decode_past_the_window_through_the_iswa_cache(env):
    """q8_0 weights, F32 cache (the bound then covers ggml's float16 GELU table, as for Gemma 3): 34 steps past
    the window of 16, KV-shared layers 4 and 5 reading layers 2 and 3's caches."""
    rc, r = _run(env, "tiny-gemma4", "llama-cpp-q8_0", "--kv-cache", "f32", "--decode", "auto",
                 "--quant-budget", "1")
    assert rc == 0 and r["status"] == "PASS", r["headline"]
    modes = {v["mode"]: v["status"] for v in r["verdicts"]}
    assert modes.get("decode") == "PASS", modes


def test_decode_steps_match_the_full_run(env):
    """Each decode step through llama.cpp's caches equals the full sequence's row (cache reading checked apart
    from the harness); a shared layer's cache view is its source layer's."""
    from parity.adapters.llama_cpp import LlamaCppAdapter

    spec = PRESETS["tiny-gemma4"]
    w = random_weights(spec, 0)
    a = LlamaCppAdapter(kv_type="f32")
    model = a.build(spec, w, "float32")
    try:
        prompt, cont = list(range(2, 20)), [21, 22, 23, 24, 25, 26]
        full = a.run(model, prompt + cont).taps
        res = a.decode(model, prompt, cont)
    finally:
        a.release(model)
    for s, step in enumerate(res.steps):
        row = len(prompt) + s
        got, want = step.taps["logits"][0], full["logits"][row]
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max(), s
        assert step.cache[4] is step.cache[2] and step.cache[5] is step.cache[3]
        assert step.cache[3].k.shape == (spec.kv_heads_for(3), row + 1, spec.head_dim_for(3))


@pytest.mark.parametrize("preset", ["tiny-gemma4", "tiny-gemma4-moe"])
def test_q8_0_passes_against_held_weights(env, preset):
    """Prefill on q8_0 (the router F32 and the 16-wide per-layer projection F16, as the converter keeps them).
    On the MoE preset llama.cpp's expert choices cross honest near-ties of the reference on its held weights,
    which the routing replay re-runs on those held weights (labelled as the run's, or pairing refuses them).
    The budget is opened: on random tiny weights the routers' near-ties flip under q8_0, so the loss against
    the given weights (KL 0.06 on the MoE preset) is no measure of a trained model's."""
    rc, r = _run(env, preset, "llama-cpp-q8_0", "--kv-cache", "f32", "--quant-budget", "1")
    assert rc == 0 and r["status"] == "PASS", r["headline"]
    if preset.endswith("moe"):
        assert any(x.get("accounted") == "replayed" for x in r["routing"]), "no honest flip replayed"


def swapped_rope_bases():
    """--impls factory: tiny-gemma4 in q8_0 with rope.freq_base and rope.freq_base_swa swapped in the GGUF."""
    from parity.adapters.llama_cpp import LlamaCppAdapter

    def edit(md):
        md["gemma4.rope.freq_base"], md["gemma4.rope.freq_base_swa"] = (md["gemma4.rope.freq_base_swa"],
                                                                        md["gemma4.rope.freq_base"])

    return LlamaCppAdapter(weights="q8_0", kv_type="f32", edit=edit)


def test_a_wrong_gguf_key_fails_and_is_read_back(env):
    rc, r = _run(env, "tiny-gemma4", f"{__name__}:swapped_rope_bases", "--quant-budget", "1")
    assert rc == 1 and r["status"] == "FAIL", r["headline"]
    assert r["first_divergence"]["tap"].startswith("layers.0."), r["headline"]
    eff = r["effective"][next(k for k in r["effective"] if not k.startswith("litgpt"))]
    assert eff["rope_base"][0] == 1_000_000.0 and eff["rope_base"][3] == 10_000.0  # the loaded bases, swapped


def test_gguf_keys_and_tensors_as_the_converter_writes_them(env):
    """No (1 + w) fold on Gemma 4's norms; rope_freqs 1 for the rotated quarter, 1e30 beyond; per-layer arrays."""
    from parity.adapters.llama_cpp import gguf_file

    spec = PRESETS["tiny-gemma4"]
    w = random_weights(spec, 0)
    path = gguf_file.cached(spec, w, "f32")
    md = gguf_file.read_metadata(path)
    assert md["gemma4.attention.key_length"] == 64 and md["gemma4.attention.key_length_swa"] == 32
    assert md["gemma4.attention.shared_kv_layers"] == 2
    assert md["gemma4.feed_forward_length"] == [128, 128, 128, 128, 256, 256]
    assert md["gemma4.attention.sliding_window_pattern"] == [True, True, True, False, True, False]
    held, types = gguf_file.read_back(spec, path)
    norm = np.empty(w.shape("model.layers.0.input_layernorm.weight"), np.float32)
    w.read_into("model.layers.0.input_layernorm.weight", norm)
    assert np.array_equal(held["model.layers.0.input_layernorm.weight"], norm)
    import gguf

    t = {x.name: x for x in gguf.GGUFReader(str(path)).tensors}
    np.testing.assert_array_equal(np.asarray(t["rope_freqs.weight"].data), np.array([1.0] * 8 + [1e30] * 24, np.float32))


def test_refusals():
    from parity.adapters.llama_cpp import LlamaCppAdapter

    a = LlamaCppAdapter()
    base = PRESETS["tiny-gemma4"]
    with pytest.raises(Unsupported, match="ple_vocab_size"):
        a.check(base.replace(ple_vocab_size=448), "float32")
    with pytest.raises(Unsupported, match="v_norm"):
        a.check(base.replace(v_norm=False), "float32")
    # layer 4 (local) reads layer 2 by the last-of-type rule; llama.cpp's positional rule reads n - 2 = 2, but
    # with the last non-shared layer local (LLGL|LG) the rules part: refused, naming the layers
    with pytest.raises(Unsupported, match="positional"):
        a.check(base.replace(layer_types=("local", "local", "global", "local", "local", "global")), "float32")
