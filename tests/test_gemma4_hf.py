"""Gemma 4 through transformers' own Gemma4ForCausalLM: every G4 tap from what the library computes,
KV sharing observed, decode through HF's cache past the window, and faults patched into the LIBRARY found
at their first tap. Tiny specs, float32, one prompt; each model is built once per module.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from parity.adapters.hf import HFAdapter
from parity.model.presets import resolve_spec
from parity.model.taps import tap_order
from parity.model.weights import random_weights

SPECS = ("tiny-gemma4", "tiny-gemma4-moe")
TOKENS = [2, 17, 301, 45, 9, 250, 33, 410, 77, 5, 128, 64, 200, 31]  # longer than the tiny window


@pytest.fixture(scope="module")
def built():
    hf = HFAdapter()
    out = {}
    for name in SPECS:
        spec = resolve_spec(name)
        model = hf.build(spec, random_weights(spec, seed=0), "float32")
        out[name] = (spec, model, hf.run(model, TOKENS).taps)
    return hf, out


@pytest.mark.parametrize("name", SPECS)
def test_every_g4_tap_comes_back(built, name):
    hf, runs = built
    spec, model, taps = runs[name]
    # optional internals, as for Gemma 3: scores are inline in eager attention; one rotary table per layer type
    assert set(taps) == {t for t in tap_order(spec) if not t.endswith("attn.scores") and t != "rope.cos"}
    T = len(TOKENS)
    if spec.num_experts:
        assert taps["layers.0.moe.router_logits"].shape == (T, spec.num_experts)
        assert taps["layers.0.moe.experts"].shape == (T, spec.top_k_experts)
        assert taps["layers.0.moe.experts"].dtype == np.float64
    if spec.ple_dim:
        assert taps["layers.0.per_layer_input"].shape == (T, spec.ple_dim)


@pytest.mark.parametrize("name", SPECS)
def test_taps_are_the_librarys_own_values(built, name):
    """The taps agree with what the library itself returns and with each other exactly (no re-computation)."""
    import torch

    hf, runs = built
    spec, model, taps = runs[name]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([TOKENS]), use_cache=False, output_hidden_states=True)
    for i in range(spec.num_layers - 1):  # hidden_states[i + 1] is layer i's output (the last is normed)
        assert np.array_equal(taps[f"layers.{i}.out"], out.hidden_states[i + 1][0].numpy())
    assert np.array_equal(taps["logits"], out.logits[0].numpy())
    for i, layer in enumerate(model.model.layers):
        scalar = layer.layer_scalar.item()
        assert scalar != 1.0  # drawn at random, so a dropped scalar would show
        assert np.array_equal(taps[f"layers.{i}.pre_scalar"] * np.float32(scalar), taps[f"layers.{i}.out"])
    if spec.num_experts:
        probs, ids, w = (taps[f"layers.0.moe.{k}"] for k in ("router_probs", "experts", "weights"))
        chosen = np.take_along_axis(probs, ids.astype(np.int64), axis=1)
        assert np.all(np.diff(chosen, axis=1) <= 0)  # sorted by descending probability
        np.testing.assert_allclose(w, chosen / chosen.sum(1, keepdims=True), rtol=1e-6)  # before per_expert_scale


@pytest.mark.parametrize("name", SPECS)
def test_kv_source_is_what_the_shared_layers_read(built, name):
    hf, runs = built
    spec, model, _ = runs[name]
    shared = range(spec.first_kv_shared, spec.num_layers)
    assert hf.effective(model)["library"]["kv_source"] == {str(i): spec.kv_source(i) for i in shared}


def _first_change(before: dict, after: dict, spec) -> str:
    assert set(after) == set(before)
    return next(t for t in tap_order(spec) if t in before and not np.array_equal(before[t], after[t]))


def test_v_norm_dropped_in_the_library_shows_first_at_attention(built, monkeypatch):
    from transformers.models.gemma4 import modeling_gemma4 as mg

    hf, runs = built
    spec, model, before = runs["tiny-gemma4"]
    orig = mg.Gemma4RMSNorm.forward
    monkeypatch.setattr(mg.Gemma4RMSNorm, "forward", lambda self, x: x if not self.with_scale else orig(self, x))
    after = hf.run(model, TOKENS).taps
    assert _first_change(before, after, spec) == "layers.0.attn"  # probabilities unchanged: only v moved
    assert np.array_equal(before["layers.0.attn.probs"], after["layers.0.attn.probs"])


def test_router_weights_not_renormalised_in_the_library_show_at_moe_weights(built, monkeypatch):
    import torch
    from transformers.models.gemma4 import modeling_gemma4 as mg

    hf, runs = built
    spec, model, before = runs["tiny-gemma4-moe"]

    def unnormalised(self, hidden_states):  # Gemma4TextRouter.forward without the renormalisation
        h = self.norm(hidden_states) * self.scale * self.scalar_root_size
        probs = torch.nn.functional.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.config.top_k_experts, dim=-1)
        return probs, w * self.per_expert_scale[idx], idx

    monkeypatch.setattr(mg.Gemma4TextRouter, "forward", unnormalised)
    after = hf.run(model, TOKENS).taps
    assert _first_change(before, after, spec) == "layers.0.moe.weights"


def test_layer_scalar_skipped_in_the_library_shows_at_the_block_output(built, monkeypatch):
    from transformers.models.gemma4 import modeling_gemma4 as mg

    hf, runs = built
    spec, model, before = runs["tiny-gemma4"]
    orig = mg.Gemma4TextDecoderLayer.forward

    @functools.wraps(orig)  # a patch that keeps the signature, as patches do: the layer's arguments by name
    def unscaled(self, *args, **kwargs):  # the block as the library computes it, with a scalar of 1
        import torch

        with torch.no_grad():
            kept = self.layer_scalar.clone()
            self.layer_scalar.fill_(1.0)
            try:
                return orig(self, *args, **kwargs)
            finally:
                self.layer_scalar.copy_(kept)

    monkeypatch.setattr(mg.Gemma4TextDecoderLayer, "forward", unscaled)
    after = hf.run(model, TOKENS).taps
    assert _first_change(before, after, spec) == "layers.0.out"


def test_decode_through_hfs_cache_past_the_window_matches_the_full_forward(built):
    """Prefill, then one step per token past the sliding window; KV-shared layers read their source's cache
    of the same step, and every step's logits agree with one full forward."""
    import torch

    hf, runs = built
    spec, model, _ = runs["tiny-gemma4"]
    prompt, cont = TOKENS[:6], TOKENS[6:] + TOKENS[:2 * spec.sliding_window - 8 + 2]
    res = hf.decode(model, prompt, cont)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompt + cont]), use_cache=False).logits[0].numpy()
    for s, step in enumerate(res.steps):
        np.testing.assert_allclose(step.taps["logits"][0], full[len(prompt) + s], atol=1e-4)
        for i in range(spec.first_kv_shared, spec.num_layers):
            src = step.cache[spec.kv_source(i)]
            assert np.array_equal(step.cache[i].k, src.k) and np.array_equal(step.cache[i].positions, src.positions)


@pytest.mark.parametrize("name", SPECS)
def test_the_harness_passes_hf_against_the_port(name):
    from parity.harness import Request, run

    spec = resolve_spec(name)
    report = run(Request(spec=spec, impls=["hf"], dtypes=["float32"], prompts={"p": TOKENS}, noise_members=0))
    assert report.passed, [(r.tap, r.max_abs) for r in report.first_divergences()]
