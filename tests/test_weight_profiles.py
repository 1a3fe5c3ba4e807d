"""The trained-like weight profile, measured through the real port (float64) on the tiny presets.

What it must reproduce (parity.model.weight_profiles): heavy-tailed norm weights, a
massive activation on BOS in one channel, an attention sink on BOS; finite in
bfloat16 and float16; and the default profile must not change by a bit.
"""

import math

import numpy as np

from parity.model import tensor_file
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.errors import ParityInputError
from parity.model.presets import PRESETS
from parity.model.prompts import default_prompts
from parity.suite.strategies import gemma_specs, token_prompts, weight_profiles
from parity.model.weights import PROFILES, random_weights

PRESET_NAMES = ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"]
# `random_weights(spec, seed).hash` before the profiles existed: the default profile is bit-identical
DEFAULT_HASHES = {
    ("tiny-gemma", 0): "70d5c8661c6a2314", ("tiny-gemma", 1): "59c68e577b5b28f4",
    ("tiny-gemma2", 0): "0d8ab683f5a07ac0", ("tiny-gemma3", 0): "7f6a8a33e6cf5f53",
    ("tiny-gemma2-27b", 1): "25407e3f38a9f520",
}


def _forward(spec, weights, dtype, tokens):
    adapter = LitgptStyleAdapter()
    taps = adapter.run(adapter.build(spec, weights, dtype), tokens).taps
    return {k: np.asarray(v, dtype=np.float64) for k, v in taps.items()}


@pytest.fixture(scope="module", params=PRESET_NAMES)
def measured(request):
    """(spec, weights, {prompt: float64 taps}) of the trained-like profile, seed 0."""
    spec = PRESETS[request.param]
    w = random_weights(spec, 0, "trained-like")
    return spec, w, {name: _forward(spec, w, "float64", ids) for name, ids in default_prompts(spec).items()}


def _bos_channel(spec, w) -> int:
    return int(np.argmax(np.abs(w.tensors["model.embed_tokens.weight"][spec.bos_token_id])))


def test_norm_weights_are_heavy_tailed(measured):
    spec, w, _ = measured
    norms = {k: 1.0 + v for k, v in w.tensors.items() if k.endswith("norm.weight")}
    g = np.concatenate(list(norms.values()))
    assert g.min() <= 0.05 and g.max() >= 20, (g.min(), g.max())  # switched-off channels and a few at ~30
    assert 0.6 < np.median(g) < 1.6 and np.mean((g > 0.3) & (g < 3)) > 0.85  # most of them modest
    c = _bos_channel(spec, w)
    assert 0.01 <= norms["model.norm.weight"][c] <= 0.05  # the final norm switches BOS's channel off
    pre = [k for k in norms if k.endswith(("input_layernorm.weight", "pre_feedforward_layernorm.weight"))
           or (spec.norm_placement == "pre" and k.endswith("post_attention_layernorm.weight"))]
    assert all(0.5 < norms[k][c] < 2 for k in pre)  # ...the per-layer pre-norms keep it


def test_bos_carries_a_massive_activation_in_one_channel(measured):
    spec, w, taps = measured
    c = _bos_channel(spec, w)
    for prompt, t in taps.items():
        for i in range(spec.num_layers):
            x = np.abs(t[f"layers.{i}.out"])
            ratio = x[0].max() / np.median(x[1:])
            assert ratio >= 100, f"{spec.name} {prompt} layer {i}: BOS peak only {ratio:.0f}x the median"
            assert int(np.argmax(x[0])) == c  # the same channel in every layer


def test_attention_sinks_on_bos(measured):
    spec, _, taps = measured
    for prompt, t in taps.items():
        mass, rest = [], []
        for i in range(spec.num_layers):
            p = t[f"layers.{i}.attn.probs"]  # [heads, T, T]
            T = p.shape[1]
            window = spec.window_for(i)
            queries = np.arange(1, T if window is None else min(T, window))  # the queries that see BOS
            mass.append(p[:, queries, 0].mean())
            rest += [p[:, q, 1:q + 1].ravel() for q in queries]
        strong = sum(m >= 0.5 for m in mass)
        assert strong >= math.ceil(0.75 * spec.num_layers), f"{spec.name} {prompt}: BOS mass per layer {mass}"
        assert np.median(np.concatenate(rest)) < 0.05  # the other probabilities are small


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_stays_finite(measured, dtype):
    spec, w, _ = measured
    t = _forward(spec, w, dtype, default_prompts(spec)["long"])
    for k, v in t.items():
        # scores hold the causal mask's -inf; everything else must be finite
        ok = ~np.isnan(v) & (v < np.inf) if k.endswith("attn.scores") else np.isfinite(v)
        assert ok.all(), f"{spec.name} {dtype}: {k} is not finite"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gemma_specs(max_layers=2, max_hidden=64, max_vocab=64), weight_profiles(), st.data())
def test_drawn_specs_stay_finite_in_float16(spec, profile, data):
    tokens = data.draw(token_prompts(spec, max_len=24))
    t = _forward(spec, random_weights(spec, 0, profile), "float16", tokens)
    assert all(np.isfinite(t[k]).all() for k in t if not k.endswith("attn.scores"))


def test_the_default_profile_is_unchanged():
    for (preset, seed), h in DEFAULT_HASHES.items():
        w = random_weights(PRESETS[preset], seed)
        assert w.hash == h == random_weights(PRESETS[preset], seed, "default").hash
        assert w.source == f"random(seed={seed})"


def test_trained_like_is_deterministic_bf16_exact_and_its_own():
    import ml_dtypes

    spec = PRESETS["tiny-gemma2"]
    a, b = random_weights(spec, 0, "trained-like"), random_weights(spec, 0, "trained-like")
    assert a.hash == b.hash != random_weights(spec, 1, "trained-like").hash
    assert a.hash != random_weights(spec, 0).hash and a.source == "random(seed=0, profile=trained-like)"
    for name, t in a.tensors.items():
        assert t.dtype == np.float32 and np.array_equal(t.astype(ml_dtypes.bfloat16).astype(np.float32), t), name


def test_the_first_layers_are_the_shallow_specs_weights():
    from parity.harness import truncate

    spec = PRESETS["tiny-gemma3"]
    deep, shallow = random_weights(spec, 0, "trained-like"), random_weights(truncate(spec, 2), 0, "trained-like")
    for k, v in shallow.tensors.items():
        np.testing.assert_array_equal(v, deep.tensors[k], err_msg=k)


def test_stored_trained_like_weights_are_the_in_memory_ones(tmp_path, monkeypatch):
    from parity.model import weight_store

    monkeypatch.setenv("PARITY_CACHE", str(tmp_path))
    monkeypatch.setattr(tensor_file, "CHUNK_ELEMENTS", 1000)  # every matrix in several blocks
    spec = PRESETS["tiny-gemma"]
    mem = random_weights(spec, 3, "trained-like")
    stored = weight_store.stored_random_weights(spec, 3, profile="trained-like")
    default = weight_store.stored_random_weights(spec, 3)
    assert "trained-like" in stored.tensors.path.name and stored.tensors.path != default.tensors.path
    assert stored.source == mem.source and stored.hash == mem.hash == stored._compute_hash()
    assert default.hash == random_weights(spec, 3).hash
    for k in mem.tensors:
        np.testing.assert_array_equal(stored.tensors[k], mem.tensors[k])


def test_an_unknown_profile_is_refused(tmp_path, monkeypatch):
    from parity.model.weight_store import stored_random_weights

    monkeypatch.setenv("PARITY_CACHE", str(tmp_path))
    spec = PRESETS["tiny-gemma"]
    for make in (lambda: random_weights(spec, 0, "trained"),
                 lambda: stored_random_weights(spec, 0, profile="trained")):
        with pytest.raises(ParityInputError, match="'trained'.*default, trained-like") as e:
            make()
        assert "\n" not in str(e.value)
    assert PROFILES == ("default", "trained-like")


def test_the_harness_and_the_cli_take_the_profile(tmp_path, capsys):
    from parity.harness import Request, run
    from parity.report.cli import build_request, main, parser

    spec = PRESETS["tiny-gemma"]
    report = run(Request(spec=spec, impls=["litgpt-style"], dtypes=["float32"], weights_profile="trained-like",
                         prompts={"p": default_prompts(spec)["short"]}))
    assert report.weights_source == "random(seed=0, profile=trained-like)"
    assert report.weights_hash == random_weights(spec, 0, "trained-like").hash
    assert build_request(parser().parse_args(["--weights-profile", "trained-like"])).weights_profile == "trained-like"
    assert build_request(parser().parse_args([])).weights_profile == "default"
    for other in (["--weights", str(tmp_path / "w.safetensors")], ["--checkpoint", str(tmp_path)]):
        assert main(["--weights-profile", "trained-like", "--out", str(tmp_path / "out"), *other]) == 2
        err = capsys.readouterr().err.strip()
        assert "--weights-profile" in err and len(err.splitlines()) == 1
