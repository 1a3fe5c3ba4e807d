"""Each library's format is one module with both directions: going there and back is the identity."""

import numpy as np
import pytest

from parity.formats import keras_hub as keras_format
from parity.model.presets import PRESETS
from parity.model.weights import random_weights

TINY = ("tiny-gemma", "tiny-gemma2", "tiny-gemma3")


@pytest.mark.parametrize("preset", TINY)
def test_keras_layout_round_trips(preset):
    spec = PRESETS[preset]
    weights = random_weights(spec, 0)
    for name, t in weights.tensors.items():
        back = keras_format.from_layout(name, keras_format.to_layout(name, t, spec), spec)
        assert back.dtype == t.dtype and np.array_equal(back, t), name


@pytest.mark.parametrize("preset", TINY)
def test_keras_layout_round_trips_the_whole_model(preset):
    spec = PRESETS[preset]
    weights = random_weights(spec, 0)
    there = keras_format.to_keras_layout(weights.tensors, spec)
    back = keras_format.from_keras_layout(dict(there), spec, where="test")
    assert sorted(back) == sorted(weights.tensors)
    for name, t in weights.tensors.items():
        assert np.array_equal(back[name], t), name


@pytest.mark.parametrize("preset", TINY)
def test_keras_layout_is_not_the_identity_on_projections(preset):
    """The round trip would pass vacuously if neither direction moved anything."""
    spec = PRESETS[preset]
    weights = random_weights(spec, 0)
    name = "model.layers.0.self_attn.q_proj.weight"
    keras = keras_format.to_layout(name, weights.tensors[name], spec)
    assert keras.shape == (spec.num_heads, spec.hidden_size, spec.head_dim)


@pytest.mark.parametrize("preset", TINY)
def test_keras_variable_paths_cover_every_tensor_once(preset):
    spec = PRESETS[preset]
    paths = keras_format.variable_paths(spec)
    assert sorted(paths) == sorted(random_weights(spec, 0).tensors)
    assert len(set(paths.values())) == len(paths)


@pytest.mark.parametrize("preset", TINY)
def test_keras_options_round_trip(preset):
    """The backbone options the adapter builds with read back, as a saved config, to the spec."""
    spec = PRESETS[preset]
    assert list(keras_format.inexpressible(spec)) == []
    cfg = {"class_name": keras_format.class_names(spec)[0], "config": keras_format.backbone_kwargs(spec)}
    back = keras_format.spec_from_config(cfg, where="test", name=spec.name)
    assert back.replace(max_position=spec.max_position) == spec
