"""The keras-hub adapter: taps, agreement with the project's port, fault visibility, bad input.

One process runs one keras backend; these tests use the default (jax). Each
dtype is built once per module (keras/JAX import and builds take seconds).
"""

from __future__ import annotations

import inspect
import math
import sys
import textwrap

import numpy as np
import pytest

from parity.errors import BackendMissing, ParityInputError
from parity.presets import PRESETS
from parity.taps import tap_names
from parity.weights import random_weights

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


def expected_shape(tap: str) -> tuple[int, int]:
    T = len(TOKENS)
    if tap == "logits":
        return (T, SPEC.vocab_size)
    if tap.endswith("attn.probs"):
        return (SPEC.num_heads, T, T)
    if tap.endswith(("mlp.gate", "mlp.up", "mlp.act", "mlp.hidden")):
        return (T, SPEC.intermediate_size)
    return (T, SPEC.hidden_size)


# ------------------------------------------------------------------ taps
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_tap_present_with_its_shape(runs, dtype):
    result = runs(dtype)
    assert result.unavailable == {}
    probs = {f"layers.{i}.attn.probs" for i in range(SPEC.num_layers)}  # optional attention internals
    assert set(result.taps) - probs == set(tap_names(SPEC))
    canonical = [t for t in result.taps if t not in probs]
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
    monkeypatch.setattr(keras.activations, "gelu", lambda x, approximate=False: tanh_gelu(x, approximate=False))
    patched = adapter.run(model, TOKENS).taps
    np.testing.assert_array_equal(patched["layers.0.mlp.gate"], base["layers.0.mlp.gate"])
    np.testing.assert_array_equal(patched["layers.0.mlp.up"], base["layers.0.mlp.up"])
    diff = np.abs(patched["layers.0.mlp.act"] - base["layers.0.mlp.act"]).max()
    assert 1e-5 < diff < 5e-4  # exact vs tanh GELU: at most 4.73e-4 apart
    assert adapter.effective(model)["activation"].startswith("exact")


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
    monkeypatch.setattr(GemmaDecoderBlock, "call", namespace["call"])
    patched = adapter.run(model, TOKENS).taps
    np.testing.assert_array_equal(patched["layers.0.mlp.gate"], base["layers.0.mlp.gate"])
    assert rel_err(patched["layers.0.mlp.act"], base["layers.0.mlp.act"]) > 0.5
    assert adapter.effective(model)["geglu"] == "gelu(up) * gate"


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


# ---------------------------------------------------------- isolated mode
def test_feed_replaces_the_sub_layer_input(adapter, models):
    model = models("float32")
    zeros = np.zeros((len(TOKENS), SPEC.hidden_size), np.float32)
    taps = adapter.run(model, TOKENS, feed={"layers.2.attn": zeros, "layers.1.mlp": zeros}).taps
    assert not taps["layers.2.attn"].any()  # no biases: attention of zeros is zero
    assert not taps["layers.1.mlp.gate"].any() and not taps["layers.1.mlp"].any()
    assert taps["layers.1.mlp_norm"].any()  # the norm itself still ran on its own input


def test_isolated_run_on_reference_inputs_agrees_locally(adapter, models, reference):
    from parity.capture import isolated_feed
    from parity.trace import Trace

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
    assert e32["activation"].startswith("tanh") and e16["activation"].startswith("tanh")
    assert e32["geglu"] == "gelu(gate) * up"
    assert e32["norm"].startswith("(1 + w)")
    assert e32["norm_placement"] == "pre"
    assert "9.79796 in float32" in e32["embed_scale"] and "9.8125 in bfloat16" in e16["embed_scale"]
    assert e32["query_scale"] == pytest.approx(SPEC.head_dim ** -0.5)
    assert e32["rope_base"] == [10_000.0] * SPEC.num_layers
    assert e32["attn_softcap"] is None and e32["final_softcap"] is None
    assert e32["window"] == [None] * SPEC.num_layers and e32["tied_head"] is True


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("changes, field", [
    (dict(norm_unit_offset=False), "norm_unit_offset"),
    (dict(gelu_approximate="none"), "gelu_approximate"),
    (dict(norm_placement="sandwich"), "norm_placement"),
    (dict(rope_base=1e6), "rope_base"),
    (dict(rope_scaling_factor=8.0), "rope_scaling_factor"),
    (dict(embed_scale=False), "embed_scale"),
    (dict(embed_scale_dtype="float32"), "embed_scale_dtype"),
    (dict(tied_head=False), "tied_head"),
    (dict(norm_eps=1e-5), "norm_eps"),
    (dict(query_pre_attn_scalar=48), "query_pre_attn_scalar"),
])
def test_unsupported_spec_field_is_refused(adapter, changes, field):
    with pytest.raises(ParityInputError, match=field):
        adapter.check(SPEC.replace(**changes), "float32")


def test_other_families_and_dtypes_are_refused(adapter):
    with pytest.raises(ParityInputError, match="family"):
        adapter.check(PRESETS["tiny-gemma2"], "float32")
    with pytest.raises(ParityInputError, match="float64"):
        adapter.check(SPEC, "float64")
    with pytest.raises(ParityInputError, match="int8"):
        adapter.check(SPEC, "int8")


def test_a_second_backend_in_one_process_is_refused(adapter):
    from parity.adapters.keras_hub import KerasAdapter

    assert sys.modules["keras"].config.backend() == "jax"
    with pytest.raises(ParityInputError, match="separate process"):
        KerasAdapter(backend="torch").check(SPEC, "float32")


def test_weight_map_refuses_a_missing_or_misnamed_tensor(models, weights):
    from parity.adapters.keras_hub import NAME_MAP, to_keras_layout
    from parity.weights import map_weights

    shapes = {v.path: tuple(v.shape) for v in models("float32").backbone.weights}
    tensors = to_keras_layout(weights.tensors, SPEC)
    map_weights(tensors, NAME_MAP, shapes, where="keras")  # the real set maps cleanly
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ParityInputError, match="ffw_gating_2"):
        map_weights(missing, NAME_MAP, shapes, where="keras")
    transposed = {**tensors, "model.layers.0.mlp.gate_proj.weight": tensors["model.layers.0.mlp.gate_proj.weight"].T}
    with pytest.raises(ParityInputError, match="shape"):
        map_weights(transposed, NAME_MAP, shapes, where="keras")
