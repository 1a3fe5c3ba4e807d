"""The float64 port of Gemma 4 against transformers' Gemma4ForCausalLM in float64, on the same canonical weights.

HF's Gemma 4 rounds to float32 in a few places whatever the dtype (every RMSNorm does `x.float()`, RoPE angles,
both softmaxes, the sqrt(hidden) buffer), so its float64 run is float32-accurate there. The port with
`float32_islands` rounds in exactly those places and agrees with HF bit for bit (asserted to 1e-10 relative);
the plain float64 port agrees to the size of those roundings (~1e-5). A broken port (ordinary partial RoPE on the
global layers, the unit offset on, K=V off, a KV-shared layer reading its own type's wrong source, the experts'
weights not renormalised) is far outside either.
"""

import numpy as np
import pytest

from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.model.presets import PRESETS
from parity.model.spec import to_hf_config
from parity.model.taps import tap_names
from parity.model.weights import random_weights

TOKENS = [2] + list(range(10, 57))  # 48 tokens: past the 16-token window
TINY = ["tiny-gemma4", "tiny-gemma4-moe"]


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def hf_logits():
    """HF float64 logits per tiny preset, the model loaded from the canonical tensors by load_state_dict."""
    import torch
    import transformers

    out = {}
    for name in TINY:
        spec = PRESETS[name]
        cfg = {k: v for k, v in to_hf_config(spec).items() if k not in ("model_type", "parity", "architectures")}
        config = transformers.Gemma4TextConfig(**cfg)
        config._attn_implementation = "eager"
        config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
        model = transformers.Gemma4ForCausalLM(config).to(torch.float64).eval()
        w = random_weights(spec, seed=0)
        missing, unexpected = model.load_state_dict(
            {k: torch.from_numpy(np.asarray(v)).to(torch.float64) for k, v in w.tensors.items()}, strict=False)
        assert missing == ["lm_head.weight"] and unexpected == []  # the tied head only
        with torch.no_grad():
            out[name] = model(torch.tensor([TOKENS]), use_cache=False).logits[0].numpy()
    return out


def _port(name, **options):
    spec = PRESETS[name]
    from parity.adapters.port_model import PortOptions  # torch: imported by the test, not at collection

    adapter = LitgptStyleAdapter(PortOptions(**options))
    model = adapter.build(spec, random_weights(spec, seed=0), "float64")
    return adapter, model, adapter.run(model, TOKENS).taps


@pytest.mark.parametrize("name", TINY)
def test_port_matches_hf_in_float64(name, hf_logits):
    _, _, islands = _port(name, float32_islands=True)
    assert _rel(islands["logits"], hf_logits[name]) < 1e-10
    _, _, exact = _port(name)
    assert _rel(exact["logits"], hf_logits[name]) < 1e-4  # only HF's float32 roundings apart


@pytest.mark.parametrize("name,changes", [
    ("tiny-gemma4", {"rope_ordinary_partial": True}),
    ("tiny-gemma4-moe", {"rope_ordinary_partial": True}),
])
def test_a_broken_port_is_far_from_hf(name, changes, hf_logits):
    _, _, taps = _port(name, float32_islands=True, **changes)
    assert _rel(taps["logits"], hf_logits[name]) > 1e-2


@pytest.mark.parametrize("name,spec_changes", [
    ("tiny-gemma4", {"norm_unit_offset": True}),
    ("tiny-gemma4", {"layer_scalar": False}),
    ("tiny-gemma4-moe", {"attention_k_eq_v": False, "num_global_kv_heads": None}),
])
def test_a_port_built_from_a_wrong_spec_is_far_from_hf(name, spec_changes, hf_logits):
    spec = PRESETS[name]
    from parity.adapters.port_model import PortOptions

    adapter = LitgptStyleAdapter(PortOptions(float32_islands=True), spec_changes=spec_changes)
    wrong = spec.replace(**spec_changes)
    model = adapter.build(spec, random_weights(wrong, seed=0), "float64")  # the wrong spec's tensors, same seed
    assert _rel(adapter.run(model, TOKENS).taps["logits"], hf_logits[name]) > 1e-2


@pytest.mark.parametrize("name", TINY)
def test_every_tap_is_recorded_with_its_shape(name):
    spec = PRESETS[name]
    adapter, model, taps = _port(name)
    assert set(tap_names(spec)) <= set(taps)
    T = len(TOKENS)
    if spec.ple_dim:
        assert taps["layers.4.per_layer_input"].shape == (T, spec.ple_dim)
        assert adapter.effective(model)["library"]["kv_source"] == {"4": 2, "5": 3}
    if spec.num_experts:
        assert taps["layers.0.moe.router_probs"].shape == (T, spec.num_experts)
        np.testing.assert_allclose(taps["layers.0.moe.router_probs"].sum(-1), 1.0, atol=1e-12)
        np.testing.assert_allclose(taps["layers.0.moe.weights"].sum(-1), 1.0, atol=1e-12)
        chosen = taps["layers.0.moe.experts"].astype(int)
        probs = taps["layers.0.moe.router_probs"]
        picked = np.take_along_axis(probs, chosen, -1)
        assert (np.diff(picked, axis=-1) <= 0).all() and (picked[:, -1] >= np.sort(probs, -1)[:, -spec.top_k_experts]).all()
    # the block output is the scalar times the pre-scalar value
    np.testing.assert_allclose(taps["layers.1.out"], taps["layers.1.pre_scalar"]
                               * random_weights(spec).tensors["model.layers.1.layer_scalar"], rtol=1e-13)


@pytest.mark.parametrize("name", TINY)
def test_decode_through_the_port_cache_matches_the_full_forward(name):
    """Prefill then one token at a time past the window: KV-shared layers read their source's cache of the step."""
    spec = PRESETS[name]
    adapter, model, full = _port(name)
    result = adapter.decode(model, TOKENS[:20], TOKENS[20:])
    for step, t in zip(result.steps, range(20, len(TOKENS))):
        np.testing.assert_allclose(step.taps["logits"][0], full["logits"][t], rtol=1e-9, atol=1e-11)
    if spec.num_kv_shared_layers:  # a shared layer's cache view is its source's
        last = result.steps[-1].cache
        np.testing.assert_array_equal(last[4].k, last[2].k)
        np.testing.assert_array_equal(last[5].k, last[3].k)
