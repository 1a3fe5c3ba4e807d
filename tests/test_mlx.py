"""`--impls mlx`: mlx-lm's own Gemma classes on MLX's CPU backend, against the float64 port, through the CLI.

Every run is the real mlx-lm 0.32.2 on tiny specs. What it computes differs from the reference in ways these
tests pin (docs/findings.md has each with its command): Gemma 1's MLP runs the exact GELU, Gemma 2 has no
sliding window, Gemma 3 rounds the embedding scale to bf16 in every dtype, and in bf16 MLX's rms_norm rounds
the normalised activation before multiplying by (1 + w). Within those, the runtime agrees: Gemma 2 on a prompt
inside its window passes in both modes, and Gemma 3's decode through mlx-lm's RotatingKVCache past the window
agrees with the port and with its own full forward. Faults patched into mlx-lm's code are located and named.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import importlib.util  # noqa: E402

# found, not imported: collecting the suite imports no framework (tests/test_collection.py)
if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
    pytest.skip("mlx / mlx-lm are not installed (pip install 'parity[mlx]')", allow_module_level=True)

from parity.report.cli import main as report_main  # noqa: E402

# 12 tokens: inside tiny-gemma2's window of 16, so its missing window cannot show
SHORT = "2,17,33,101,7,250,44,9,300,12,88,61"
LONG = ",".join([SHORT] * 3)  # 36 tokens: past the window


def report(tmp_path, name: str, *args: str) -> tuple[int, dict]:
    out = tmp_path / name
    code = report_main(["--impls", "mlx", "--out", str(out), "--quiet", *args])
    return code, json.loads((out / "report.json").read_text())


def verdicts(r: dict) -> dict:
    return {(v["dtype"], v["mode"]): v for v in r["verdicts"]}


def causes(r: dict, dtype: str) -> dict[str, str]:
    return {d["cause"]: d["tap"] for d in r["diagnosis"] if d["dtype"] == dtype}


def diffs(r: dict, run: str) -> dict:
    """property -> (reference's value, run's value) for each effective property that differs, as the report
    compares them (parity.model.effective)."""
    from parity.model.effective import differences

    return {d.property: (d.reference, d.value) for d in differences(r["effective"], r["reference"])
            if d.run == run}


def first(r: dict, dtype: str, mode: str = "cumulative") -> str | None:
    return next((f["tap"] for f in r["first_divergences"] if f["dtype"] == dtype and f["mode"] == mode), None)


@pytest.fixture(scope="module")
def gemma2_short(tmp_path_factory):
    return report(tmp_path_factory.mktemp("g2s"), "r", "--spec", "tiny-gemma2", "--dtypes", "float32",
                  "--tokens", SHORT, "--mode", "both")


def test_gemma2_within_its_window_passes_cumulative_and_isolated(gemma2_short):
    code, r = gemma2_short
    assert code == 0 and r["status"] == "PASS", r["headline"]
    v = verdicts(r)
    for mode in ("cumulative", "isolated"):
        assert v[("float32", mode)]["status"] == "PASS"
        # the inline scores and probabilities are recorded from mlx-lm's own mx.softmax call, and compared
        assert "layers.0.attn.probs" not in v[("float32", mode)]["not_compared"]
        assert set(v[("float32", mode)]["not_compared"]) == {"rope.cos"}


def test_gemma1_runs_the_exact_gelu(tmp_path):
    code, r = report(tmp_path, "g1", "--spec", "tiny-gemma", "--dtypes", "float32", "--tokens", SHORT)
    assert code == 1 and r["status"] == "FAIL"
    assert first(r, "float32") == "layers.0.mlp.act"
    assert causes(r, "float32")["gelu-exact"] == "layers.0.mlp.act"
    assert diffs(r, "mlx@float32") == {"gelu_approximate": ("tanh", "none")}
    lib = r["effective"]["mlx@float32"]["library"]
    assert "hidden_activation" in lib["config_keys_not_read"]  # gemma.ModelArgs has no activation key
    assert lib["model_args"]["model_type"] == "gemma" and lib["model_args"]["rope_theta"] == 10000.0
    not_compared = verdicts(r)[("float32", "cumulative")]["not_compared"]
    assert "mx.fast.scaled_dot_product_attention" in not_compared["layers.0.attn.probs"]
    assert "mx.fast.rope" in not_compared["rope.cos"]


def test_gemma2_has_no_sliding_window(tmp_path):
    code, r = report(tmp_path, "g2", "--spec", "tiny-gemma2", "--dtypes", "float32", "--tokens", LONG)
    assert code == 1
    assert first(r, "float32") == "layers.0.attn.scores"
    assert causes(r, "float32")["sliding-window"] == "layers.0.attn.probs"
    assert diffs(r, "mlx@float32") == {"sliding_window": ((16, None, 16, None), (None,) * 4)}
    assert "sliding_window" in r["effective"]["mlx@float32"]["library"]["config_keys_not_read"]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return report(tmp_path_factory.mktemp("g3"), "r", "--spec", "tiny-gemma3", "--dtypes", "float32,bfloat16",
                  "--tokens", LONG, "--decode", "auto")


def test_gemma3_float32_rounds_the_embedding_scale_to_bf16(gemma3):
    _, r = gemma3
    assert first(r, "float32") == "embed"
    assert causes(r, "float32")["embed-scale-rounded"] == "embed"  # named by the embedding probe
    assert diffs(r, "mlx@float32")["embed_scale"][1] == 9.8125  # bf16(sqrt(96)), where the port has sqrt(96)
    assert diffs(r, "mlx@bfloat16") == {}  # what the spec asks for in bf16


def test_gemma3_bfloat16_agrees_but_rounds_the_norm_before_its_weight(gemma3):
    _, r = gemma3
    v = verdicts(r)[("bfloat16", "cumulative")]
    assert v["passed_taps"] == v["taps"] and v["first_divergence"] is None
    assert causes(r, "bfloat16")["norm-cast-order"] == "layers.0.attn_norm"  # mx.fast.rms_norm, bf16
    assert v["status"] == "FAIL"  # a formula Gemma's reference fixes: named, and failed, though within noise


def test_gemma3_decode_through_mlx_caches_past_the_window(gemma3):
    _, r = gemma3
    v = verdicts(r)
    steps = len(r["decode"]["continuation"])
    assert steps == 2 * 16 + 2  # auto: every RotatingKVCache(max_size=16) wraps twice
    assert v[("bfloat16", "decode")]["status"] == "PASS"  # against the port, every step
    assert v[("float32", "decode-self")]["status"] == "PASS"  # against its own full forward
    assert v[("bfloat16", "decode-self")]["status"] == "PASS"
    # every layer's cache.k / cache.v compared at every step, and passing
    cache = {e["tap"] for e in r["taps"] if e["mode"] == "decode" and e["dtype"] == "bfloat16"
             and ".cache." in e["tap"] and e["passed"]}
    assert cache == {f"layers.{i}.cache.{kv}" for i in range(6) for kv in "kv"}


def test_decode_cache_views_hold_the_window(tmp_path):
    """The positions the adapter reports come from mlx-lm's own cache code (a position-encoded twin)."""
    from parity.adapters.mlx import MlxAdapter
    from parity.model.presets import resolve_spec
    from parity.model.weights import random_weights

    spec = resolve_spec("tiny-gemma3")
    a = MlxAdapter()
    m = a.build(spec, random_weights(spec), "float32")
    try:
        res = a.decode(m, list(range(3, 23)), [5, 6, 7])  # prompt 20 > window 16
        last = res.steps[-1]
        p = 20 + 2
        assert sorted(last.cache[0].positions.tolist()) == list(range(p - 15, p + 1))  # local: the last 16
        assert sorted(last.cache[5].positions.tolist()) == list(range(p + 1))  # global: all
        assert last.cache[0].k.shape == (2, 16, 32)
        # the model's tree is as load_model built it: no recording wrapper left behind
        assert type(m.model.model.layers[0]).__name__ == "TransformerBlock"
        assert type(m.model.model.layers[0].mlp.gate_proj).__name__ == "Linear"
    finally:
        a.release(m)


# ---------------------------------------------------------------- faults patched into mlx-lm's own code
def _norm_without_offset(self, x):
    import mlx.core as mx

    return mx.fast.rms_norm(x, self.weight, self.eps)


def _no_final_softcap(self, inputs, cache=None):
    return self.model.embed_tokens.as_linear(self.model(inputs, cache))


@pytest.mark.parametrize("attr, fault, tap, cause", [
    ("RMSNorm.__call__", _norm_without_offset, "layers.0.attn_norm", "norm-unit-offset-missing"),
    ("Model.__call__", _no_final_softcap, "logits", "final-softcap-missing"),
])
def test_fault_in_mlx_lm_is_located_and_named(tmp_path, monkeypatch, attr, fault, tap, cause):
    from mlx_lm.models import gemma2

    cls, meth = attr.split(".")
    monkeypatch.setattr(getattr(gemma2, cls), meth, fault)
    code, r = report(tmp_path, "f", "--spec", "tiny-gemma2", "--dtypes", "float32", "--tokens", SHORT)
    assert code == 1
    assert first(r, "float32") == tap
    assert causes(r, "float32").get(cause) == tap, r["diagnosis"]


def test_scores_mask_is_minus_inf():
    """Gemma 2's masked scores (mlx-lm writes finfo(dtype).min) reach the contract as -inf, per dtype."""
    import ml_dtypes

    from parity.adapters.mlx.adapter import _heads

    for dtype, low in (("float32", np.finfo(np.float32).min), ("float16", np.finfo(np.float16).min),
                       ("bfloat16", ml_dtypes.finfo(ml_dtypes.bfloat16).min)):
        a = np.array([[[[1.0, low]]]], dtype=np.float32)  # [kv, repeats, T, S]
        got = _heads(a, True, dtype)
        assert got.shape == (1, 1, 2) and got[0, 0, 0] == 1.0 and got[0, 0, 1] == -np.inf


def test_spec_values_mlx_lm_does_not_take_show_in_effective():
    """A value the config carries but mlx-lm's classes never read shows as the value the built model has,
    not the spec's: Gemma 1's query_pre_attn_scalar and Gemma 2's rope scaling (parity's own keys, which no
    ModelArgs has), and a Gemma 3 layer pattern no sliding_window_pattern expresses (mlx-lm's default 6)."""
    from parity.adapters.mlx import MlxAdapter
    from parity.model.presets import resolve_spec
    from parity.model.weights import random_weights

    a = MlxAdapter()

    def effective(spec):
        a.check(spec, "float32")
        m = a.build(spec, random_weights(spec), "float32")
        try:
            return a.effective(m)
        finally:
            a.release(m)

    g3 = resolve_spec("tiny-gemma3")
    e = effective(resolve_spec("tiny-gemma").replace(query_pre_attn_scalar=48.0))
    assert e["query_scale"] == [32 ** -0.5] * 4  # the spec asks for 48 ** -0.5
    e = effective(resolve_spec("tiny-gemma2").replace(rope_scaling_factor=8.0))
    assert e["rope_scaling_factor"] == [1.0] * 4
    e = effective(g3.replace(layer_types=("local", "local", "global", "local", "global", "local")))
    assert e["sliding_window"] == [16] * 5 + [None] and "parity" not in e["library"]["config_keys_not_read"]
    e = effective(g3)  # the real pattern is taken, with its rope per layer type
    assert e["sliding_window"] == [16] * 5 + [None]
    assert e["rope_base"] == [1e4] * 5 + [1e6] and e["rope_scaling_factor"] == [1.0] * 5 + [8.0]
    assert e["gelu_approximate"] == "tanh" and e["geglu"] == "gate" and e["norm_unit_offset"] is True


def test_a_cache_one_slot_short_is_found_at_the_step_the_window_fills(tmp_path, monkeypatch):
    """mlx-lm's Gemma 3 given RotatingKVCache(max_size=window - 1) on its local layers: the 12-token prompt
    decodes through the window; at step 3 (position 15) a local layer must see 16 keys and holds 15."""
    from mlx_lm.models import gemma3_text
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    def make_cache(self):
        a = self.args
        return [KVCache() if (i + 1) % a.sliding_window_pattern == 0 else RotatingKVCache(max_size=a.sliding_window - 1)
                for i in range(a.num_hidden_layers)]

    monkeypatch.setattr(gemma3_text.Model, "make_cache", make_cache)
    code, r = report(tmp_path, "d", "--spec", "tiny-gemma3", "--dtypes", "bfloat16", "--tokens", SHORT,
                     "--decode", "auto")
    assert code == 1 and verdicts(r)[("bfloat16", "decode")]["status"] == "FAIL"
    f = next(f for f in r["first_divergences"] if f["mode"] == "decode")
    assert (f["tap"], f["step"]) == ("layers.0.cache.k", 3)
    assert any(d["cause"] == "cache-window" and d["tap"] == "layers.0.cache.k" and d["step"] == 3
               for d in r["diagnosis"])

