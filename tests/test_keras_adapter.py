"""The keras-hub adapter: taps, agreement with the project's port, fault visibility, bad input.

One process runs one keras backend; these tests use the default (jax). Each
dtype is built once per module (keras/JAX import and builds take seconds);
Gemma 2 and Gemma 3 (float32) are built once each by their own module-scoped
fixture, and run on a prompt longer than their sliding window.
"""

from __future__ import annotations

import inspect
import math
import sys
import textwrap

import numpy as np
import pytest

from parity.errors import BackendMissing, ParityInputError, Unsupported
from parity.model.presets import PRESETS
from parity.model.taps import tap_names
from parity.model.weights import random_weights

SPEC = PRESETS["tiny-gemma"]
TOKENS = [2, 17, 300, 45, 9, 511, 128, 77]


@pytest.fixture(scope="module")
def adapter():
    from parity.adapters.keras_hub import KerasAdapter

    a = KerasAdapter()
    try:
        a.check(SPEC, "float32")
    except BackendMissing as e:
        pytest.skip(str(e))
    except ParityInputError as e:  # keras already imported on another backend in this process
        pytest.skip(str(e))
    return a


@pytest.fixture(scope="module")
def weights():
    return random_weights(SPEC, seed=0)


@pytest.fixture(scope="module")
def models(adapter, weights):
    built: dict = {}

    def get(dtype: str):
        if dtype not in built:
            built[dtype] = adapter.build(SPEC, weights, dtype)
        return built[dtype]

    yield get
    for m in built.values():
        adapter.release(m)


@pytest.fixture(scope="module")
def runs(adapter, models):
    """Unpatched cumulative runs, one per dtype."""
    done: dict = {}

    def get(dtype: str):
        if dtype not in done:
            done[dtype] = adapter.run(models(dtype), TOKENS)
        return done[dtype]

    return get


@pytest.fixture(scope="module")
def reference(weights):
    from parity.adapters.litgpt_style import LitgptStyleAdapter

    ref = LitgptStyleAdapter()
    return ref.run(ref.build(SPEC, weights, "float64"), TOKENS).taps


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| over the RMS of ref, in float64."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.sqrt(np.mean(ref**2)))


def expected_shape(tap: str, spec=SPEC, T: int = len(TOKENS)) -> tuple[int, ...]:
    if tap == "logits":
        return (T, spec.vocab_size)
    if tap == "rope.cos":
        return (T, spec.head_dim)
    if tap.endswith("attn.probs"):
        return (spec.num_heads, T, T)
    if tap.endswith(("mlp.gate", "mlp.up", "mlp.act", "mlp.hidden")):
        return (T, spec.intermediate_size)
    return (T, spec.hidden_size)


def scores_taps(spec) -> set[str]:
    return {f"layers.{i}.attn.scores" for i in range(spec.num_layers)}


# ------------------------------------------------------------------ taps
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_tap_present_with_its_shape(runs, dtype):
    result = runs(dtype)
    # the masked scores never exist as a value in keras-hub (the Softmax layer adds its mask inside)
    assert set(result.unavailable) == scores_taps(SPEC)
    assert all("Softmax" in why for why in result.unavailable.values())
    internal = {f"layers.{i}.attn.probs" for i in range(SPEC.num_layers)} | {"rope.cos"}  # optional internals
    assert set(result.taps) - internal == set(tap_names(SPEC))
    assert internal <= set(result.taps)
    canonical = [t for t in result.taps if t not in internal]
    assert canonical == [t for t in tap_names(SPEC) if t in result.taps]  # forward order
    for tap, a in result.taps.items():
        assert a.shape == expected_shape(tap), tap
        assert a.dtype == np.float32, tap  # bf16 widened (exactly)
        assert np.isfinite(a).all(), tap


def test_attention_probabilities_are_causal_rows_per_head(runs, reference):
    T = len(TOKENS)
    taps = runs("float32").taps
    for i in range(SPEC.num_layers):
        p = taps[f"layers.{i}.attn.probs"]
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
        assert not p[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]].any()  # the future: exactly 0
        if f"layers.{i}.attn.probs" in reference:  # same head order as the port
            assert rel_err(p, reference[f"layers.{i}.attn.probs"]) < 1e-5


def test_taps_are_the_values_that_flow_between_sub_layers(adapter, models, runs):
    # the glue is exact IEEE arithmetic in float32, so the recorded operands reproduce it bit for bit
    taps = runs("float32").taps
    for i in range(SPEC.num_layers):
        p, prev = f"layers.{i}.", "embed" if i == 0 else f"layers.{i - 1}.out"
        np.testing.assert_array_equal(taps[p + "attn_residual"], taps[prev] + taps[p + "attn"])
        np.testing.assert_array_equal(taps[p + "mlp.hidden"], taps[p + "mlp.act"] * taps[p + "mlp.up"])
        np.testing.assert_array_equal(taps[p + "out"], taps[p + "mlp"] + taps[p + "attn_residual"])
    # and recording changes nothing: the same model called without wrappers gives the same logits
    ids = np.asarray([TOKENS], dtype="int32")
    plain = models("float32").lm({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    np.testing.assert_array_equal(np.asarray(plain)[0], taps["logits"])


def test_version_names_the_libraries(adapter):
    v = adapter.version()
    assert v.startswith(("keras-hub ", "keras-nlp ")) and "/ keras " in v and "/ jax " in v


# ------------------------------------------------------- against the port
def test_float32_agrees_with_port_float64_at_every_tap(runs, reference):
    result = runs("float32")
    errs = {t: rel_err(result.taps[t], reference[t]) for t in tap_names(SPEC)}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, f"{worst}: max error {errs[worst]:.3g} x RMS"


def test_bfloat16_stays_within_bf16_error_of_port_float64(runs, reference):
    # bf16 keeps 8 bits (one rounding: up to 2**-9 relative) and errors grow
    # through the layers. Measured on tiny-gemma: worst max error 0.13 x RMS
    # (layers.3.mlp.hidden, a product with heavy tails), worst mean error
    # 0.010 x RMS (layers.3.mlp). A wrong weight layout or formula is ~1 x RMS.
    result = runs("bfloat16")
    worst_max = max(tap_names(SPEC), key=lambda t: rel_err(result.taps[t], reference[t]))
    assert rel_err(result.taps[worst_max], reference[worst_max]) < 0.3, worst_max
    for tap in tap_names(SPEC):
        a, ref = np.asarray(result.taps[tap], np.float64), np.asarray(reference[tap], np.float64)
        mean_err = np.abs(a - ref).mean() / np.sqrt(np.mean(ref**2))
        assert 1e-4 < mean_err < 0.03, (tap, mean_err)  # really bf16, and no more than bf16 error


def test_bfloat16_embed_scale_is_rounded_to_bf16(runs, weights):
    # keras-hub: x * cast(sqrt(hidden), x.dtype): sqrt(96) = 9.798 becomes 9.8125
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    table = weights.tensors["model.embed_tokens.weight"][TOKENS].astype(bf16)
    want = (table * np.asarray(math.sqrt(SPEC.hidden_size), np.float32).astype(bf16)).astype(np.float32)
    np.testing.assert_array_equal(runs("bfloat16").taps["embed"], want)


# ------------------------------------------- library changes show in the trace
def test_exact_gelu_patched_into_the_block_shows_at_act_only(adapter, models, runs, monkeypatch):
    import keras

    from keras_hub.src.models.gemma import gemma_decoder_block

    assert gemma_decoder_block.keras.activations is keras.activations  # what the block looks up
    tanh_gelu = keras.activations.gelu
    model, base = models("float32"), runs("float32").taps  # before the patch, whatever ran first
    monkeypatch.setattr(model, "clean", model.clean)  # effective() reads the last unfed run: restored after
    monkeypatch.setattr(keras.activations, "gelu", lambda x, approximate=False: tanh_gelu(x, approximate=False))
    patched = adapter.run(model, TOKENS).taps
    np.testing.assert_array_equal(patched["layers.0.mlp.gate"], base["layers.0.mlp.gate"])
    np.testing.assert_array_equal(patched["layers.0.mlp.up"], base["layers.0.mlp.up"])
    diff = np.abs(patched["layers.0.mlp.act"] - base["layers.0.mlp.act"]).max()
    assert 1e-5 < diff < 5e-4  # exact vs tanh GELU: at most 4.73e-4 apart
    e = adapter.effective(model)
    assert e["gelu_approximate"] == "none" and e["library"]["activation"].startswith("exact")


def test_swapped_geglu_patched_into_block_call_shows_in_trace(adapter, models, runs, monkeypatch):
    from keras_hub.src.models.gemma import gemma_decoder_block
    from keras_hub.src.models.gemma.gemma_decoder_block import GemmaDecoderBlock

    src = textwrap.dedent(inspect.getsource(GemmaDecoderBlock.call))
    line = "keras.activations.gelu(x1, approximate=True) * x2"
    if line not in src:
        pytest.skip("the installed GemmaDecoderBlock.call spells its GeGLU differently")
    namespace: dict = {}
    exec(compile(src.replace(line, "keras.activations.gelu(x2, approximate=True) * x1"),
                 "<patched GemmaDecoderBlock.call>", "exec"), vars(gemma_decoder_block), namespace)
    model, base = models("float32"), runs("float32").taps  # before the patch, whatever ran first
    monkeypatch.setattr(model, "clean", model.clean)  # effective() reads the last unfed run: restored after
    monkeypatch.setattr(GemmaDecoderBlock, "call", namespace["call"])
    patched = adapter.run(model, TOKENS).taps
    np.testing.assert_array_equal(patched["layers.0.mlp.gate"], base["layers.0.mlp.gate"])
    assert rel_err(patched["layers.0.mlp.act"], base["layers.0.mlp.act"]) > 0.5
    assert adapter.effective(model)["geglu"] == "up"  # gelu(up) * gate


def test_wrappers_are_removed_even_when_the_forward_pass_fails(adapter, models, monkeypatch):
    import keras

    def broken(x, approximate=False):
        raise RuntimeError("boom")

    monkeypatch.setattr(keras.activations, "gelu", broken)
    model = models("float32")
    with pytest.raises(RuntimeError, match="boom"):
        adapter.run(model, TOKENS)
    assert keras.activations.gelu is broken
    layers = model.lm._flatten_layers(include_self=True, recursive=True)
    assert [lay.name for lay in layers if "call" in vars(lay)] == []
    assert [lay.name for lay in layers if "_compute_cos_sin_embedding" in vars(lay)] == []


# ---------------------------------------------------------- isolated mode
def test_feed_replaces_the_sub_layer_input(adapter, models):
    model = models("float32")
    zeros = np.zeros((len(TOKENS), SPEC.hidden_size), np.float32)
    taps = adapter.run(model, TOKENS, feed={"layers.2.attn": zeros, "layers.1.mlp": zeros}).taps
    assert not taps["layers.2.attn"].any()  # no biases: attention of zeros is zero
    assert not taps["layers.1.mlp.gate"].any() and not taps["layers.1.mlp"].any()
    assert taps["layers.1.mlp_norm"].any()  # the norm itself still ran on its own input


def test_isolated_run_on_reference_inputs_agrees_locally(adapter, models, reference):
    from parity.capture.runner import isolated_feed
    from parity.capture.trace import Trace

    ref = Trace(impl="litgpt-style", version="", dtype="float64", spec=SPEC.to_dict(), weights_hash="",
                tokens=TOKENS, taps=reference)
    feed = isolated_feed(SPEC, ref)
    taps = adapter.run(models("float32"), TOKENS, feed=feed).taps
    for tap in feed:
        assert rel_err(taps[tap], reference[tap]) < 1e-5, tap


@pytest.mark.parametrize("feed", [
    {"embed": np.zeros((8, 96))},  # produced by glue, not a sub-layer
    {"layers.0.mlp.hidden": np.zeros((8, 256))},
    {"layers.9.attn": np.zeros((8, 96))},  # no such layer
    {"layers.0.attn": np.zeros((7, 96))},  # wrong shape
])
def test_bad_feed_is_refused(adapter, models, feed):
    with pytest.raises(ParityInputError):
        adapter.run(models("float32"), TOKENS, feed=feed)


# ----------------------------------------------------------- effective
def test_effective_reads_the_built_model(adapter, models):
    e32, e16 = adapter.effective(models("float32")), adapter.effective(models("bfloat16"))
    assert e32["gelu_approximate"] == e16["gelu_approximate"] == "tanh"
    assert e32["geglu"] == "gate" and e32["norm_unit_offset"] is True
    assert e32["norm_placement"] == "pre"
    assert e32["embed_scale"] == pytest.approx(96 ** 0.5) and e16["embed_scale"] == 9.8125
    assert "9.79796 in float32" in e32["library"]["embed_scale"] and "9.8125 in bfloat16" in e16["library"]["embed_scale"]
    assert e32["query_scale"] == pytest.approx([SPEC.head_dim ** -0.5] * SPEC.num_layers)
    assert e32["rope_base"] == [10_000.0] * SPEC.num_layers
    assert e32["attn_softcap"] == [None] * SPEC.num_layers and e32["final_softcap"] is None
    assert e32["sliding_window"] == [None] * SPEC.num_layers and e32["tied_head"] is True


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("changes, field", [
    (dict(norm_unit_offset=False), "norm_unit_offset"),
    (dict(gelu_approximate="none"), "gelu_approximate"),
    (dict(rope_base=1e6), "rope_base"),
    (dict(rope_scaling_factor=8.0), "rope_scaling_factor"),
    (dict(embed_scale=False), "embed_scale"),
    (dict(embed_scale_dtype="float32"), "embed_scale_dtype"),
    (dict(tied_head=False), "tied_head"),
    (dict(norm_eps=1e-5), "norm_eps"),
    (dict(query_pre_attn_scalar=48), "query_pre_attn_scalar"),  # neither head_dim 32 nor hidden/heads 24
])
def test_unsupported_spec_field_is_refused(adapter, changes, field):
    with pytest.raises(Unsupported, match=field):
        adapter.check(SPEC.replace(**changes), "float32")


def test_dtypes_are_refused_and_every_family_is_accepted(adapter):
    for name in ("tiny-gemma2", "tiny-gemma2-27b", "tiny-gemma3"):
        adapter.check(PRESETS[name], "float32")
    adapter.check(SPEC.replace(norm_placement="sandwich"), "float32")  # GemmaBackbone's post norms
    adapter.check(PRESETS["tiny-gemma3"].replace(norm_placement="pre"), "float32")
    with pytest.raises(ParityInputError, match="float64"):
        adapter.check(SPEC, "float64")
    with pytest.raises(ParityInputError, match="int8"):
        adapter.check(SPEC, "int8")


def test_a_second_backend_in_one_process_is_refused(adapter):
    from parity.adapters.keras_hub import KerasAdapter

    assert sys.modules["keras"].config.backend() == "jax"
    other = KerasAdapter(backend="torch")
    assert other.needs_own_process()  # the harness captures it in a fresh process (parity.capture.runner)
    other.check(SPEC, "float32")  # so check only looks for the package...
    with pytest.raises(ParityInputError, match="separate process"):
        other.build(SPEC, random_weights(SPEC, seed=0), "float32")  # ...and building here is refused


def test_weight_map_refuses_a_missing_or_misnamed_tensor(models, weights):
    from parity.adapters.keras_hub import NAME_MAP, to_keras_layout
    from parity.model.weights import map_weights

    shapes = {v.path: tuple(v.shape) for v in models("float32").backbone.weights}
    tensors = to_keras_layout(weights.tensors, SPEC)
    map_weights(tensors, NAME_MAP, shapes, where="keras")  # the real set maps cleanly
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ParityInputError, match="ffw_gating_2"):
        map_weights(missing, NAME_MAP, shapes, where="keras")
    transposed = {**tensors, "model.layers.0.mlp.gate_proj.weight": tensors["model.layers.0.mlp.gate_proj.weight"].T}
    with pytest.raises(ParityInputError, match="shape"):
        map_weights(transposed, NAME_MAP, shapes, where="keras")


# ============================================================ Gemma 2 and Gemma 3
# float32, one build per spec (module-scoped), on a prompt longer than the window (16)
LONG = [2] + [(37 * k + 11) % 509 + 3 for k in range(39)]


class Built:
    """One keras-hub model of a spec, its run on LONG, and the float64 port's taps on the same weights."""

    def __init__(self, adapter, name: str) -> None:
        from parity.adapters.litgpt_style import LitgptStyleAdapter

        self.spec = PRESETS[name]
        self.weights = random_weights(self.spec, seed=0)
        self.model = adapter.build(self.spec, self.weights, "float32")
        self.result = adapter.run(self.model, LONG)
        port = LitgptStyleAdapter()
        self.ref = port.run(port.build(self.spec, self.weights, "float64"), LONG).taps

    def trace(self, taps: dict, impl: str, dtype: str, spec=None):
        from parity.capture.trace import Trace

        return Trace(impl=impl, version="", dtype=dtype, spec=(spec or self.spec).to_dict(),
                     weights_hash=self.weights.hash, tokens=LONG, taps=taps)

    def compare(self, ref_taps: dict | None = None, ref_spec=None):
        """The report's comparison (its tolerance table) of the keras run with a float64 port trace."""
        from parity.compare.pairs import compare_trace

        spec = ref_spec or self.spec
        ref = self.trace(self.ref if ref_taps is None else ref_taps, "litgpt-style", "float64", spec)
        return compare_trace(ref, self.trace(self.result.taps, "keras", "float32", spec))


@pytest.fixture(scope="module")
def gemma2(adapter):
    b = Built(adapter, "tiny-gemma2")
    yield b
    adapter.release(b.model)


@pytest.fixture(scope="module")
def gemma3(adapter):
    b = Built(adapter, "tiny-gemma3")
    yield b
    adapter.release(b.model)


@pytest.fixture(params=["gemma2", "gemma3"])
def fam(request):
    return request.getfixturevalue(request.param)


def test_family_every_port_tap_keras_can_give_is_present_with_its_shape(fam):
    spec, result, ref = fam.spec, fam.result, fam.ref
    assert set(result.unavailable) == scores_taps(spec)  # the only port taps keras-hub cannot give
    assert set(ref) - set(result.taps) == scores_taps(spec)
    assert set(tap_names(spec)) <= set(result.taps)
    for i in range(spec.num_layers):
        assert {f"layers.{i}.post_attn_norm", f"layers.{i}.post_mlp_norm"} <= set(result.taps)
    canonical = [t for t in result.taps if t in tap_names(spec)]
    assert canonical == tap_names(spec)  # forward order
    for tap, a in result.taps.items():
        assert a.shape == expected_shape(tap, spec, len(LONG)) == ref[tap].shape, tap
        assert a.dtype == np.float32 and np.isfinite(a).all(), tap


def test_family_float32_agrees_with_port_float64_within_tolerance(fam):
    results = fam.compare()
    assert {r.tap for r in results} == set(fam.result.taps)  # every tap compared, probs and rope.cos too
    bad = [r.message() for r in results if not r.passed]
    assert not bad, bad[:3]
    errs = {t: rel_err(fam.result.taps[t], fam.ref[t]) for t in tap_names(fam.spec)}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, f"{worst}: max error {errs[worst]:.3g} x RMS"  # measured: ~1.5e-5


def test_family_taps_are_the_values_that_flow_through_the_sandwich(fam):
    taps = fam.result.taps
    for i in range(fam.spec.num_layers):
        p, prev = f"layers.{i}.", "embed" if i == 0 else f"layers.{i - 1}.out"
        np.testing.assert_array_equal(taps[p + "attn_residual"], taps[prev] + taps[p + "post_attn_norm"])
        np.testing.assert_array_equal(taps[p + "mlp.hidden"], taps[p + "mlp.act"] * taps[p + "mlp.up"])
        np.testing.assert_array_equal(taps[p + "out"], taps[p + "attn_residual"] + taps[p + "post_mlp_norm"])


def test_family_attention_window_as_keras_hub_masks_it(fam):
    # window w: query i sees key j iff 0 <= i - j < w (HF), on the layers the spec makes local
    T = len(LONG)
    i, j = np.indices((T, T))
    for layer in range(fam.spec.num_layers):
        w = fam.spec.window_for(layer)
        visible = (i >= j) & ((i - j < w) if w else True)
        p = fam.result.taps[f"layers.{layer}.attn.probs"]
        assert not p[:, ~visible].any(), layer
        assert (p[:, visible] > 0).all(), layer
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


def test_family_isolated_run_on_reference_inputs_agrees_locally(adapter, fam):
    from parity.capture.runner import isolated_feed

    feed = isolated_feed(fam.spec, fam.trace(fam.ref, "litgpt-style", "float64"))
    assert {f"layers.0.post_attn_norm", "layers.0.post_mlp_norm"} <= set(feed)
    taps = adapter.run(fam.model, LONG, feed=feed).taps
    for tap in feed:
        assert rel_err(taps[tap], fam.ref[tap]) < 1e-5, tap


def test_family_effective_reads_the_built_model(adapter, fam):
    s, e = fam.spec, adapter.effective(fam.model)
    n, lib = s.num_layers, e["library"]
    assert lib["differs_from_spec"] == {}
    assert e["gelu_approximate"] == "tanh" and e["geglu"] == "gate"
    assert e["norm_unit_offset"] is True and e["norm_placement"] == "sandwich"
    assert e["sliding_window"] == [s.window_for(i) for i in range(n)]  # read off keras-hub's own mask
    assert e["rope_base"] == [s.rope_base_for(i) for i in range(n)]
    assert e["rope_scaling_factor"] == [s.rope_factor_for(i) for i in range(n)]
    assert lib["rope_scaling"] == [f"linear {s.rope_factor_for(i):g}" for i in range(n)]
    assert e["query_scale"] == pytest.approx([s.query_scale] * n)
    assert e["attn_softcap"] == [s.attn_softcap] * n and e["final_softcap"] == s.final_softcap
    assert e["tied_head"] is True and e["qk_norm"] is s.qk_norm
    if s.qk_norm:
        assert lib["qk_norm"].startswith("RMSNorm over head_dim on q and k, before RoPE")
        assert lib["class"] == "Gemma3Backbone / Gemma3CausalLM"
        assert "not permuted" in lib["rope"]
    else:
        assert lib["qk_norm"] is False and lib["class"] == "GemmaBackbone / GemmaCausalLM"
        assert "permuted to interleaved" in lib["rope"]


def test_family_weight_map_names_the_missing_tensor(fam):
    from parity.adapters.keras_hub import name_map, to_keras_layout
    from parity.model.weights import map_weights

    shapes = {v.path: tuple(v.shape) for v in fam.model.backbone.weights}
    tensors = to_keras_layout(fam.weights.tensors, fam.spec)
    map_weights(tensors, name_map(fam.spec), shapes, where="keras")  # the real set maps cleanly
    for name, path in (("model.layers.1.post_feedforward_layernorm.weight", "post_ffw_norm"),
                       ("model.layers.1.pre_feedforward_layernorm.weight", "pre_ffw_norm")):
        with pytest.raises(ParityInputError, match=path):
            map_weights({k: v for k, v in tensors.items() if k != name}, name_map(fam.spec), shapes, where="keras")
    if fam.spec.qk_norm:
        with pytest.raises(ParityInputError, match="key_norm"):
            missing = {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.k_norm.weight"}
            map_weights(missing, name_map(fam.spec), shapes, where="keras")


@pytest.mark.parametrize("name, changes, field", [
    ("tiny-gemma2", dict(layer_types=("global", "local", "global", "local")), "layer_types"),  # odd local
    ("tiny-gemma2", dict(rope_base=1e6), "rope_base"),
    ("tiny-gemma2", dict(query_pre_attn_scalar=64.0), "query_pre_attn_scalar"),
    ("tiny-gemma3", dict(rope_local_base=2e4), "rope_local_base"),
    ("tiny-gemma3", dict(rope_base=5e5), "rope_base"),
    ("tiny-gemma3", dict(layer_types=("local",) * 4 + ("global", "local")), "layer_types"),
    ("tiny-gemma3", dict(norm_eps=1e-5), "norm_eps"),
])
def test_family_inexpressible_field_is_refused(adapter, name, changes, field):
    with pytest.raises(Unsupported, match=f"has {field}="):
        adapter.check(PRESETS[name].replace(**changes), "float32")


# ----------------------------------------- keras-hub drops query_head_dim_normalize=False
@pytest.fixture(scope="module")
def gemma2_27b(adapter):
    b = Built(adapter, "tiny-gemma2-27b")
    yield b
    adapter.release(b.model)


def test_27b_query_scaling_is_asked_for_and_dropped_by_keras_hub(gemma2_27b):
    b = gemma2_27b
    assert b.model.requested["query_head_dim_normalize"] is False  # 1/sqrt(hidden // heads) = 1/sqrt(48)
    assert all(not blk.query_head_dim_normalize for blk in b.model.backbone.transformer_layers)
    diff = b.model.differences["query_pre_attn_scalar"]
    assert (diff["spec"], diff["built"]) == (48, 32) and "query_head_dim_normalize=True" in diff["why"]
    # what keras-hub computes is the port with 1/sqrt(head_dim), within the float32 tolerance
    from parity.adapters.litgpt_style import LitgptStyleAdapter

    port = LitgptStyleAdapter(spec_changes={"query_pre_attn_scalar": 32.0})
    as_built = port.run(port.build(b.spec, b.weights, "float64"), LONG).taps
    bad = [r.message() for r in b.compare(as_built) if not r.passed]
    assert not bad, bad[:3]


@pytest.mark.xfail(strict=True, reason=(
    "keras-hub 0.32.0 GemmaDecoderBlock builds CachedGemmaAttention with query_head_dim_normalize=True "
    "whatever it is given: tiny-gemma2-27b is scaled by 1/sqrt(32), not 1/sqrt(48). Measured on LONG "
    "(float32 vs the float64 port): first beyond tolerance layers.0.attn.probs, max abs 0.0998 (1.45 x RMS; "
    "4.9e-6 allowed); layers.0.attn 0.57 x RMS; logits max abs 0.52 (0.55 x RMS), mean KL 5.1e-3, top-1 95%. "
    "The report names cause query-scale (the port with 1/sqrt(32) reproduces it)"))
def test_27b_float32_agrees_with_port_float64(gemma2_27b):
    bad = [r for r in gemma2_27b.compare() if not r.passed]
    assert not bad, f"{bad[0].tap}: {rel_err(gemma2_27b.result.taps[bad[0].tap], gemma2_27b.ref[bad[0].tap]):.3g}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_variables_hold_the_weights_in_their_own_dtype(models, weights, dtype):
    """The variables are initialised from the weights (no random init): each holds its declared dtype
    (a float32 value in a float16 variable would compute in float32) and the canonical values."""
    m = models(dtype)
    assert {str(v.value.dtype) for v in m.backbone.weights} == {dtype}
    emb = np.asarray(m.backbone.token_embedding.embeddings.value, np.float32)
    np.testing.assert_array_equal(emb, weights.tensors["model.embed_tokens.weight"].astype(dtype).astype(np.float32))
