"""llama.cpp (`llama-cpp*`): the GGUF parity writes from the canonical weights, run by llama.cpp itself, against the
float64 port.

Real writer (gguf-py), real llama.cpp (llama-cpp-python 0.3.36), tiny specs; the GGUFs go to a module-private
PARITY_CACHE. What llama.cpp computes in a float32 run with f32 weights differs from the float64 port in two places
by design, both measured here and both outside float32's honest noise, so no f32-weight run PASSes:

- ggml-cpu's float32 GELU (GGML_GELU_FP16 in ggml-cpu/vec.h) rounds gelu's input to float16 and reads the value
  from a float16 table: `layers.0.mlp.hidden` is the first divergence of every family with an F32 KV cache
  (38-51x the bound), and the table reproduces llama.cpp's values (the exact GELU does not);
- with the default F16 KV cache, the K cache and the query the KQ matmul reads are float16
  (`layers.0.attn.scores` first).

Every tap before that is compared and within its bound, and every computed tap is compared (only rope.cos and
mlp.act are declared unavailable). Quantized files (q8_0, q4_0, q4_K) PASS against the port on `held()`'s weights
with their activation rounding, prefill and decode through llama.cpp's own (iSWA) KV cache past the window; a
GGUF metadata fault (Gemma 3's local and global RoPE bases swapped) is found at layer 0's scores and named
rope-base; and the port on `held()` agrees with llama.cpp far better than on the given weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest

# found, not imported: collecting the suite imports no framework (tests/test_collection.py)
if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("llama-cpp needs pip install 'parity[llama-cpp]'", allow_module_level=True)

from parity.errors import ParityInputError, Unsupported  # noqa: E402
from parity.model.presets import resolve_spec  # noqa: E402
from parity.model.weights import random_weights  # noqa: E402
from parity.report.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
TOKENS = list(range(1, 13))


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


def swapped_rope_bases():
    """--impls factory: q4_0 weights, the GGUF written with Gemma 3's rope.freq_base and rope.freq_base_swa
    swapped (q4_0: its honest bound covers the GELU table, so the counterfactual search can name the cause)."""
    from parity.adapters.llama_cpp import LlamaCppAdapter

    def edit(md):
        md["gemma3.rope.freq_base"], md["gemma3.rope.freq_base_swa"] = (md["gemma3.rope.freq_base_swa"],
                                                                        md["gemma3.rope.freq_base"])

    return LlamaCppAdapter(weights="q4_0", kv_type="f32", edit=edit)


def _wide(env, preset: str) -> str:
    """`preset` with hidden, intermediate and q widths multiples of 256 (a K-quant's block), as a config file."""
    from parity.model.spec import to_hf_config

    base = resolve_spec(preset)
    spec = dataclasses.replace(base, hidden_size=256, intermediate_size=512, head_dim=64, name=f"{preset}-256",
                               query_pre_attn_scalar=64 if base.query_pre_attn_scalar else None)
    cfg = to_hf_config(spec)
    cfg.pop("parity", None)
    path = env.mktemp("spec") / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _not_compared(r: dict) -> set[str]:
    return {t.split(" ")[0] for v in r["verdicts"] for t in v.get("not_compared", {})}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(b)
    assert np.array_equal(finite, np.isfinite(a))
    return float(np.abs(a[finite] - b[finite]).max() / np.sqrt((b[finite] ** 2).mean()))


# ------------------------------------------------------------------ the harness on float32 runs
@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_f32_run_diverges_first_at_the_gelu_table(env, preset):
    rc, r = _run(env, preset, "llama-cpp", "--kv-cache", "f32")
    assert rc == 1 and r["status"] == "FAIL"  # a divergence, not an implementation failure (3)
    assert r["first_divergence"]["tap"] == "layers.0.mlp.hidden", r["headline"]
    (v,) = r["verdicts"]
    assert v["passed_taps"] > 0
    # every tap llama.cpp computes is compared: only the fused GELU's output and the cos table are declared
    assert {t for t in _not_compared(r)} <= {"rope.cos", "layers.*.mlp.act"} | {
        f"layers.{i}.mlp.act" for i in range(8)}, _not_compared(r)
    eff = r["effective"]["llama-cpp@float32"]
    ref = r["effective"]["litgpt-style@float64"]
    for p in ("norm_unit_offset", "norm_placement", "query_scale", "rope_base", "rope_scaling_factor",
              "attn_softcap", "final_softcap", "sliding_window", "qk_norm", "tied_head", "head_dim"):
        assert eff[p] == pytest.approx(ref[p]), p
    assert eff["library"]["settings"] == {"weights": "f32", "kv_cache": "f32", "flash_attn": "off", "threads": "1"}


def _ggml_gelu_table(x: np.ndarray) -> np.ndarray:
    """ggml-cpu's float32 GELU (GGML_GELU_FP16): the input rounded to float16, the tanh GELU evaluated in float32
    at that value (ggml_gelu_f32, as its table is filled) and stored as float16; |x| >= 10 passes through."""
    h = x.astype(np.float16).astype(np.float32)
    c = np.float32(0.7978845608028654)
    g = (np.float32(0.5) * h * (np.float32(1) + np.tanh(c * h * (np.float32(1) + np.float32(0.044715) * h * h))))
    g = g.astype(np.float16).astype(np.float32)
    return np.where(x <= -10, np.float32(0), np.where(x >= 10, x, g))


def test_the_gelu_table_reproduces_llama_cpp(env):
    from parity.adapters.llama_cpp import LlamaCppAdapter

    spec = resolve_spec("tiny-gemma2")
    w = random_weights(spec, 0)
    a = LlamaCppAdapter(kv_type="f32")
    taps = a.run(a.build(spec, w, "float32"), TOKENS).taps
    gate, up, hidden = (taps[f"layers.0.mlp.{t}"].astype(np.float64) for t in ("gate", "up", "hidden"))
    exact = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3))) * up
    table = _ggml_gelu_table(taps["layers.0.mlp.gate"]).astype(np.float64) * up
    assert _rel(hidden, exact) > 1e-3  # the float64 GELU is 40-50x the float32 bound away
    # the float16 table is what llama.cpp computed (to a float16 ulp where float32 tanh rounds differently)
    assert _rel(hidden, table) < 5e-5


def test_default_f16_kv_cache_is_honest_rounding(env):
    """llama.cpp's default F16 cache rounds K, V, q (for K) and the probabilities (for V) to f16: declared by
    held() (Held.kv), the honest members round the same, and a correct run passes, the cache type shown."""
    rc, r = _run(env, "tiny-gemma", "llama-cpp")
    assert rc == 0, r["headline"]
    assert r["effective"]["llama-cpp@float32"]["library"]["settings"]["kv_cache"] == "f16"
    assert r["runs"][0]["settings"]["kv_rounding"] == "f16"


def undeclared_f16_cache():
    """--impls factory: llama.cpp's F16 cache, its rounding not declared (held() says nothing of it)."""
    from parity.adapters.llama_cpp import LlamaCppAdapter

    class Undeclared(LlamaCppAdapter):
        def held(self, spec, weights, dtype):
            return None

    return Undeclared(weights="f32", kv_type="f16")


def test_an_undeclared_f16_cache_fails_at_the_scores(env):
    """What Held.kv is for: the same run with the cache's rounding undeclared fails where the f16 keys are read."""
    rc, r = _run(env, "tiny-gemma", f"{__name__}:undeclared_f16_cache")
    assert rc == 1 and r["first_divergence"]["tap"] == "layers.0.attn.scores", r["headline"]


def test_with_a_float_cache_the_gelu_table_is_the_divergence(env):
    """An F32 cache leaves ggml's float16 GELU table as the first divergence, named (gelu-fp16-table)."""
    rc, r = _run(env, "tiny-gemma2", "llama-cpp", "--kv-cache", "f32")
    assert rc == 1 and r["first_divergence"]["tap"] == "layers.0.mlp.hidden", r["headline"]
    assert r["verdicts"][0]["explained_by"] == "gelu-fp16-table", r["headline"]


def test_the_gelu_table_is_named_on_the_decode_path(env):
    """The default F16 cache and f32 weights: the prefill passes (the table within the cache's rounding), but the
    decode steps cross float16 table entries the full forward did not, and decode-self parts from the run's own
    forward at an mlp.hidden. The geglu-fused probe read on the decode steps names it; it was `unexplained`."""
    rc, r = _run(env, "tiny-gemma3", "llama-cpp", "--decode", "auto")
    failing = [v for v in r["verdicts"] if v["status"] == "FAIL"]
    assert failing, r["headline"]  # the premise: the table shows on the decode path
    for v in failing:
        assert v["first_divergence"]["tap"].endswith("mlp.hidden"), r["headline"]
        assert v["explained_by"] == "gelu-fp16-table", r["headline"]


def test_decode_auto_through_llama_cpps_cache(env):
    """q4_0 on Gemma 3 (iSWA caches), past the window: every prefill and decode tap within the honest bound of the
    port on held(), and the cache views llama.cpp holds after each step (a V cache read untransposed fails at
    layers.0.cache.v)."""
    rc, r = _run(env, "tiny-gemma3", "llama-cpp-q4_0", "--kv-cache", "f32", "--decode", "auto", "--quant-budget", "1")
    assert rc == 0 and r["status"] == "PASS", r["headline"]
    modes = {v["mode"]: v["status"] for v in r["verdicts"]}
    assert modes.get("decode") == "PASS" and modes.get("decode-self") == "PASS", modes


@pytest.mark.parametrize("impl,spec,kv", [("llama-cpp-q8_0", "tiny-gemma2", "f32"), ("llama-cpp-q4_0", "tiny-gemma", "f32"),
                                          ("llama-cpp-q4_k", "wide", "f32"), ("llama-cpp-f16", "tiny-gemma3", "f16")])
def test_quantized_runs_pass_against_held(env, impl, spec, kv):
    """Against the port on held() with the activation rounding held() names (f16 weights: activations f16, which
    also covers the default F16 KV cache's float16 query in the KQ matmul)."""
    rc, r = _run(env, _wide(env, "tiny-gemma2") if spec == "wide" else spec, impl, "--kv-cache", kv,
                 "--quant-budget", "1")
    assert rc == 0 and r["status"] == "PASS", r["headline"]
    (run,) = [k for k in r["effective"] if k.startswith("llama-cpp")]
    assert r["effective"][run]["library"]["settings"]["weights"] == impl.rsplit("-", 1)[1]


def test_decode_steps_match_the_full_run(env):
    """Each decode step through llama.cpp's KV cache (past the window of 16) equals the full sequence's row."""
    from parity.adapters.llama_cpp import LlamaCppAdapter

    spec = resolve_spec("tiny-gemma3")
    w = random_weights(spec, 0)
    a = LlamaCppAdapter(kv_type="f32")
    model = a.build(spec, w, "float32")
    prompt, cont = list(range(1, 15)), [20, 21, 22, 23, 24]
    whole = a.run(model, prompt + cont).taps
    res = a.decode(model, prompt, cont)
    assert len(res.steps) == len(cont)
    for s, step in enumerate(res.steps):
        p = len(prompt) + s
        for tap in ("layers.0.attn", "layers.5.attn", "layers.0.attn_norm"):
            # float32 and the GELU table's float16 steps (a 1-token matmul sums in another order): far below
            # what a wrong cache position or window moves (order 1)
            assert _rel(step.taps[tap][0], whole[tap][p]) < 1e-3, (tap, s)
        local = step.taps["layers.0.attn.probs"][:, 0]  # [heads, p + 1]: layer 0 is local (window 16)
        first = max(0, p - 15)  # the oldest position the window still sees
        assert np.all(local[:, :first] == 0) and np.all(local[:, first:] > 0)
        view = step.cache[5]
        assert list(view.positions) == list(range(p + 1)) and view.k.shape == (2, p + 1, 32)
    assert p - 15 > 0  # the last steps are past the window
    a.release(model)


# ------------------------------------------------------------------ a fault in the GGUF metadata
def test_swapped_rope_bases_are_found(env):
    rc, r = _run(env, "tiny-gemma3", "tests.test_llama_cpp:swapped_rope_bases", "--quant-budget", "1")
    assert rc == 1 and r["first_divergence"]["tap"] == "layers.0.attn.scores", r["headline"]
    assert [v["explained_by"] for v in r["verdicts"]] == ["rope-base"]
    runs = [k for k in r["effective"] if "litgpt-style" not in k]
    got, ref = r["effective"][runs[0]], r["effective"]["litgpt-style@float64"]
    assert got["rope_base"] == [1e6] * 5 + [1e4] and ref["rope_base"] == [1e4] * 5 + [1e6]
    assert got["sliding_window"] == ref["sliding_window"]


def test_omitted_softcap_key_reads_llama_cpps_default(env):
    """Gemma 2 with the final softcap key left out: llama.cpp's loader default (30), not the spec's 3."""
    from parity.adapters.llama_cpp import LlamaCppAdapter

    spec = resolve_spec("tiny-gemma2")
    w = random_weights(spec, 0)

    def edit(md):
        del md["gemma2.final_logit_softcapping"]

    clean, faulty = LlamaCppAdapter(kv_type="f32"), LlamaCppAdapter(kv_type="f32", edit=edit)
    mc, mf = clean.build(spec, w, "float32"), faulty.build(spec, w, "float32")
    assert clean.effective(mc)["final_softcap"] == pytest.approx(3.0)
    assert faulty.effective(mf)["final_softcap"] == pytest.approx(30.0)
    tc, tf = clean.run(mc, TOKENS).taps, faulty.run(mf, TOKENS).taps
    assert np.array_equal(tc["final_norm"], tf["final_norm"]) and not np.allclose(tc["logits"], tf["logits"])


# ------------------------------------------------------------------ quantized files
def test_held_reads_the_file_back(env):
    from parity.adapters.llama_cpp import LlamaCppAdapter
    from parity.adapters.llama_cpp.gguf_file import read_back

    spec = resolve_spec("tiny-gemma3")
    w = random_weights(spec, 0)
    assert LlamaCppAdapter(kv_type="f32").held(spec, w, "float32") is None  # f32 weights, f32 cache: as given
    plain = LlamaCppAdapter().held(spec, w, "float32")  # the default F16 cache: the given weights, kv rounding
    assert plain.weights is w and plain.kv == "f16" and plain.activations is None
    a = LlamaCppAdapter(weights="q4_0")
    held = a.held(spec, w, "float32")
    assert held.weight_type == "q4_0" and held.activations in ("q8_0", "q8_0-x86")  # x86: half to even
    again, types = read_back(spec, a._file(spec, w))  # the cached file, not a second one
    for k, v in held.weights.tensors.items():
        assert v.shape == w.tensors[k].shape and v.dtype == np.float32
        assert np.array_equal(v, again[k])
        if k.endswith("norm.weight"):
            assert types[k] == "F32"
            assert np.array_equal(v + np.float32(1), w.tensors[k] + np.float32(1))  # the fold undone exactly
        else:
            assert types[k] == "Q4_0"
            scale = np.abs(w.tensors[k]).reshape(v.shape[0], -1, 32).max(-1, keepdims=True) / 8
            assert np.all(np.abs(v - w.tensors[k]).reshape(scale.shape[:2] + (32,)) <= scale * 1.01)


@pytest.mark.parametrize("weights,better", [("q8_0", 1e4), ("q4_0", 1e4)])
def test_held_weights_explain_the_quantized_run(env, weights, better):
    """The port with llama.cpp's activation rounding on held() agrees with llama.cpp far better than on the
    given weights (layer 0's attention output, before the GELU table's rounding enters): to float32 rounding."""
    import platform

    from parity.adapters.litgpt_style import LitgptStyleAdapter
    from parity.adapters.llama_cpp import LlamaCppAdapter
    from parity.adapters.port_model import PortOptions

    spec = resolve_spec("tiny-gemma2")
    w = random_weights(spec, 0)
    a = LlamaCppAdapter(weights=weights, kv_type="f32")
    held = a.held(spec, w, "float32")
    got = a.run(a.build(spec, w, "float32"), TOKENS).taps
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    cases = [("given", w, None), ("held", held.weights, held.activations)]
    if weights == "q8_0" and x86:
        assert held.activations == "q8_0-x86"
        cases.append(("half-away", held.weights, "q8_0"))  # the generic C's rounding: one activation lands on a tie
    err = {}
    for label, ww, aq in cases:
        port = LitgptStyleAdapter(options=PortOptions(act_quant=aq))
        err[label] = _rel(got["layers.0.attn"], port.run(port.build(spec, ww, "float32"), TOKENS).taps["layers.0.attn"])
    assert err["held"] * better < err["given"] and err["held"] < 1e-5, err
    if "half-away" in err:
        assert err["half-away"] > 1e-3, err  # ggml's x86 path rounds half to even: the kind is not a detail


def test_k_quant_needs_widths_of_256(env):
    from parity.adapters.litgpt_style import LitgptStyleAdapter
    from parity.adapters.llama_cpp import LlamaCppAdapter
    from parity.adapters.port_model import PortOptions

    a = LlamaCppAdapter(weights="q4_k", kv_type="f32")
    with pytest.raises(ParityInputError, match="hidden_size = 96 is not a multiple of 256"):
        a.check(resolve_spec("tiny-gemma"), "float32")
    spec = dataclasses.replace(resolve_spec("tiny-gemma"), hidden_size=256, intermediate_size=512, head_dim=64,
                               name="tiny-gemma-256")
    a.check(spec, "float32")
    w = random_weights(spec, 0)
    held = a.held(spec, w, "float32")
    assert (held.weight_type, held.activations) == ("q4_k", "q8_K")
    got = a.run(a.build(spec, w, "float32"), TOKENS).taps
    err = {}
    for label, ww, aq in (("given", w, None), ("held", held.weights, held.activations)):
        port = LitgptStyleAdapter(options=PortOptions(act_quant=aq))
        err[label] = _rel(got["layers.0.attn"], port.run(port.build(spec, ww, "float32"), TOKENS).taps["layers.0.attn"])
    assert err["held"] * 1e4 < err["given"], err


# ------------------------------------------------------------------ what is refused or declared
def test_refusals(env):
    from parity.adapters.llama_cpp import LlamaCppAdapter

    a = LlamaCppAdapter()
    with pytest.raises(Unsupported, match="float32"):
        a.check(resolve_spec("tiny-gemma"), "bfloat16")
    with pytest.raises(Unsupported, match="query-scale"):  # 48 = hidden / heads, which llama.cpp keys to 46 layers
        a.check(resolve_spec("tiny-gemma2-27b"), "float32")
    with pytest.raises(ParityInputError, match="flash_attn='on'"):
        LlamaCppAdapter(kv_type="q8_0").check(resolve_spec("tiny-gemma"), "float32")
    with pytest.raises(ParityInputError, match="kv_type"):
        LlamaCppAdapter(kv_type="q5_1")


def test_flash_attention_declares_scores_unavailable(env):
    from parity.adapters.llama_cpp import LlamaCppAdapter

    spec = resolve_spec("tiny-gemma2")
    w = random_weights(spec, 0)
    on, off = LlamaCppAdapter(kv_type="q8_0", flash_attn="on"), LlamaCppAdapter(kv_type="f32")
    on.check(spec, "float32")
    r_on = on.run(on.build(spec, w, "float32"), TOKENS)
    r_off = off.run(off.build(spec, w, "float32"), TOKENS)
    assert "layers.0.attn.scores" in r_on.unavailable and "layers.0.attn.scores" not in r_on.taps
    assert "layers.0.attn.scores" in r_off.taps
    # the quantized cache and FA's float16 K/V move the attention output, within the cache type's precision
    assert 1e-4 < _rel(r_on.taps["layers.0.attn"], r_off.taps["layers.0.attn"]) < 5e-2


def omitted_final_softcap():
    """--impls factory: tiny-gemma2 in q4_0 with the final softcap key left out of the GGUF (llama.cpp's loader
    then uses 30 where the spec says 3)."""
    from parity.adapters.llama_cpp import LlamaCppAdapter

    def edit(md):
        del md["gemma2.final_logit_softcapping"]

    return LlamaCppAdapter(weights="q4_0", kv_type="f32", edit=edit)


def test_a_dropped_config_value_is_found_at_the_logits_and_named(env):
    """The runtime's own view (its loader's default for an absent key) beside the spec names the cause."""
    rc, r = _run(env, "tiny-gemma2", f"{__name__}:omitted_final_softcap", "--quant-budget", "1")
    assert rc == 1 and r["first_divergence"]["tap"] == "logits", r["headline"]
    assert r["verdicts"][0]["explained_by"] in ("config-value-dropped", "final-softcap-missing"), r["headline"]
    said = " ".join(d["evidence"] for d in r["diagnosis"])
    assert "final_softcap" in said, said
