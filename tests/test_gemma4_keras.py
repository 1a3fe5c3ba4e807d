"""keras-hub's Gemma 4 (Gemma4Backbone, JAX backend) through the keras adapter: every tap recorded from what
keras-hub computes, checked against HF's Gemma4ForCausalLM on the same canonical weights, against
keras-hub's own plain forward pass, and with faults injected into keras-hub located at their first tap.

One process runs one keras backend (JAX here). Each preset is built and run once per module; a run on
the 24-token prompt (longer than the presets' 16-token window) costs ~30 s of XLA compiles on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity.errors import ParityInputError
from parity.model.presets import resolve_spec
from parity.model.taps import tap_order
from parity.model.weights import random_weights

PRESETS = ("tiny-gemma4", "tiny-gemma4-moe")
TOKENS = [2] + [int(t) for t in np.random.default_rng(3).integers(3, 500, 23)]  # 24 > window 16
# the shared layers of tiny-gemma4 (LLLGLG, 2 shared): layer 4 (local) reads 2, layer 5 (global) reads 3
KV_SOURCE = {"tiny-gemma4": {"4": 2, "5": 3}, "tiny-gemma4-moe": {}}


def rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.sqrt(np.mean(ref**2)), 1e-30))


@pytest.fixture(scope="module")
def adapter():
    import importlib.util

    if importlib.util.find_spec("keras_hub") is None:  # not imported: the adapter sets the backend first
        pytest.skip("keras-hub is not installed")
    from parity.adapters.keras_hub import KerasAdapter

    ad = KerasAdapter("jax")
    try:
        ad.check(resolve_spec("tiny-gemma4"), "float32")
    except ParityInputError as e:  # keras already imported on another backend in this process
        pytest.skip(str(e))
    return ad


@pytest.fixture(scope="module")
def runs(adapter):
    """preset -> (model, weights, clean RunResult)"""
    out = {}
    for name in PRESETS:
        spec = resolve_spec(name)
        w = random_weights(spec, seed=0)
        m = adapter.build(spec, w, "float32")
        out[name] = (m, w, adapter.run(m, TOKENS))
    return out


def first_divergent(spec, taps: dict, ref: dict, tol: float = 1e-4) -> str | None:
    for t in tap_order(spec):
        if t in taps and t in ref and rel(taps[t], ref[t]) > tol:
            return t
    return None


@pytest.mark.parametrize("name", PRESETS)
def test_every_tap_recorded_or_declared(runs, name):
    m, _, r = runs[name]
    spec = m.spec
    for t in tap_order(spec):
        assert t in r.taps or r.unavailable.get(t), f"{name}: tap {t} neither recorded nor declared"
    # the only declared taps: the masked scores, which keras-hub never materialises
    assert {t for t in r.unavailable if t in tap_order(spec)} == {
        f"layers.{i}.attn.scores" for i in range(spec.num_layers)}
    T = len(TOKENS)
    for i in range(spec.num_layers):
        assert r.taps[f"layers.{i}.out"].shape == (T, spec.hidden_size)
        if spec.ple_dim:
            assert r.taps[f"layers.{i}.per_layer_input"].shape == (T, spec.ple_dim)
        if spec.num_experts:
            assert r.taps[f"layers.{i}.moe.router_probs"].shape == (T, spec.num_experts)
            assert r.taps[f"layers.{i}.moe.experts"].shape == (T, spec.top_k_experts)


@pytest.mark.parametrize("name", PRESETS)
def test_recorded_values_are_the_library_s(runs, name):
    """The recorded logits are the plain forward's; pre_scalar x scalar is out; moe taps are consistent."""
    from keras import ops

    m, w, r = runs[name]
    spec = m.spec
    ids = np.asarray([TOKENS], "int32")
    plain = m.lm({"token_ids": ids, "padding_mask": np.ones_like(ids),
                  "position_ids": np.arange(len(TOKENS), dtype="int32")[None]}, training=False)
    assert np.array_equal(np.asarray(ops.convert_to_numpy(plain))[0], r.taps["logits"])
    for i in range(spec.num_layers):
        s = np.float32(w.tensors[f"model.layers.{i}.layer_scalar"].reshape(()))
        assert np.array_equal(r.taps[f"layers.{i}.pre_scalar"] * s, r.taps[f"layers.{i}.out"]), i
        if spec.num_experts:
            probs, experts = r.taps[f"layers.{i}.moe.router_probs"], r.taps[f"layers.{i}.moe.experts"]
            top = np.argsort(-probs, axis=-1, kind="stable")[:, :spec.top_k_experts]
            assert np.array_equal(experts, top.astype(np.float64))
            assert np.allclose(r.taps[f"layers.{i}.moe.weights"].sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", PRESETS)
def test_kv_source_and_settings_read_back(adapter, runs, name):
    m, _, _ = runs[name]
    eff = adapter.effective(m)
    assert eff["kv_source"] == KV_SOURCE[name]
    assert eff["library"]["differs_from_spec"] == {}
    assert eff["query_scale"] == [1.0] * m.spec.num_layers and eff["norm_unit_offset"] is False
    assert eff["library"]["gemma4"]["rotary_dims"][[t == "global" for t in m.spec.layer_types].index(True)] == 16  # 0.25 x 64


def test_a_dropped_setting_shows(runs):
    """A backbone built without a Gemma 4 setting (here: double-wide MLP) is named in differs_from_spec."""
    from parity.adapters.keras_hub import gemma4

    m, _, _ = runs["tiny-gemma4"]
    wrong = m.spec.replace(double_wide_mlp=False)
    assert "mlp_width" in gemma4.differences(wrong, m.backbone)


@pytest.mark.parametrize("name", PRESETS)
def test_matches_hf(runs, name):
    """keras-hub and HF's Gemma4ForCausalLM, float32, same canonical weights: every layer output and the logits."""
    torch = pytest.importorskip("torch")
    try:
        from transformers.models.gemma4.modeling_gemma4 import Gemma4ForCausalLM
    except ImportError:
        pytest.skip("this transformers has no Gemma 4")
    from transformers import Gemma4TextConfig

    from parity.model.spec import to_hf_config

    m, w, r = runs[name]
    cfg = Gemma4TextConfig.from_dict(to_hf_config(m.spec))
    cfg._experts_implementation = "eager"
    hf = Gemma4ForCausalLM(cfg).float().eval()
    sd = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in w.tensors.items()}
    sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    hf.load_state_dict(sd, strict=False)
    outs = {}
    for i, layer in enumerate(hf.model.layers):
        layer.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        logits = hf(torch.tensor([TOKENS])).logits[0].numpy()
    for i in range(m.spec.num_layers):
        assert rel(r.taps[f"layers.{i}.out"], outs[i][0].numpy()) < 1e-4, i
    assert rel(r.taps["logits"], logits) < 1e-4


# ------------------------------------------------------------ faults injected into keras-hub
def _attention_scale_1_over_sqrt_hd(monkeypatch):
    from keras_hub.src.models.gemma4.gemma4_attention import Gemma4TextAttention

    original = Gemma4TextAttention._compute_attention

    def scaled(self, q, *args, **kwargs):
        return original(self, q * (1.0 / float(self.head_dim) ** 0.5), *args, **kwargs)

    monkeypatch.setattr(Gemma4TextAttention, "_compute_attention", scaled)


def _layer_scalar_skipped(monkeypatch):
    from keras_hub.src.models.gemma4.gemma4_decoder_block import Gemma4TextDecoderBlock

    original = Gemma4TextDecoderBlock.call

    def call(self, *args, **kwargs):
        object.__setattr__(self, "is_text_layer", False)  # the block then skips `x * layer_scalar`
        try:
            return original(self, *args, **kwargs)
        finally:
            object.__setattr__(self, "is_text_layer", True)

    monkeypatch.setattr(Gemma4TextDecoderBlock, "call", call)


def _weights_not_renormalised(monkeypatch):
    from keras import ops
    from keras_hub.src.models.gemma4 import gemma4_moe

    class Ops:  # keras.ops as the MoE module sees it, but the renormaliser's denominator is 1
        def __getattr__(self, name):
            return (lambda a, b: ops.ones_like(a)) if name == "maximum" else getattr(ops, name)

    monkeypatch.setattr(gemma4_moe, "ops", Ops())


FAULTS = [  # (preset, fault, first tap it must be located at)
    ("tiny-gemma4", _attention_scale_1_over_sqrt_hd, "layers.0.attn.probs"),
    ("tiny-gemma4", _layer_scalar_skipped, "layers.0.out"),
    ("tiny-gemma4-moe", _weights_not_renormalised, "layers.0.moe.weights"),
]


@pytest.mark.parametrize("name,fault,where", FAULTS, ids=[f[1].__name__.strip("_") for f in FAULTS])
def test_fault_in_keras_hub_located_at_its_first_tap(adapter, runs, monkeypatch, name, fault, where):
    m, _, clean = runs[name]
    assert first_divergent(m.spec, clean.taps, clean.taps) is None
    with monkeypatch.context() as mp:
        fault(mp)
        broken = adapter.run(m, TOKENS)
    assert first_divergent(m.spec, broken.taps, clean.taps) == where


def test_decode_through_keras_hub_cache_past_the_window(adapter, runs):
    """keras-hub's own cache (call_with_cache), 20-token prompt + 6 steps past the 16-token window: each
    step equals the full forward's row; the shared layers' cache view is their source's (4 <- 2, 5 <- 3)."""
    m, _, _ = runs["tiny-gemma4"]
    prompt, cont = TOKENS[:20], TOKENS[20:]
    d = adapter.decode(m, prompt, cont)
    full = adapter.run(m, prompt + cont)
    assert len(d.steps) == len(cont)
    for s, step in enumerate(d.steps):
        p = len(prompt) + s
        for t, v in step.taps.items():
            if t in full.taps and t != "rope.cos" and not t.endswith("attn.probs"):
                assert rel(v[0], full.taps[t][p]) < 1e-4, (s, t)
        for i, j in KV_SOURCE["tiny-gemma4"].items():
            assert np.array_equal(step.cache[int(i)].k, step.cache[j].k)
            assert step.cache[int(i)].k.shape[1] == p + 1
    assert step.cache[3].k.shape[-1] == m.spec.global_head_dim  # the global layer's own corner of the cache


@pytest.mark.parametrize("name", PRESETS)
def test_report_against_the_port_passes(name, tmp_path):
    """`python -m parity.report --spec <preset> --impls keras --dtypes float32`: PASS against the float64 port
    (a fresh process: the harness runs the port first, then keras-hub on JAX)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PARITY_THREADS": "1", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-m", "parity.report", "--spec", name, "--impls", "keras", "--dtypes",
                          "float32", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "PASS" in out.stdout and "keras@float32" in out.stdout
