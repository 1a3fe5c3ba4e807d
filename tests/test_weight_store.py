"""The on-disk weight store: bit-identical to the in-memory weights, read a block at a time."""

import math

import ml_dtypes
import numpy as np
import pytest

from parity.model import weight_store
from parity.model import tensor_file
from parity.errors import ParityInputError
from parity.model.presets import PRESETS
from parity.model.weights import Weights, load_weights, random_weights, save_weights


@pytest.fixture()
def small_chunks(monkeypatch):
    # blocks of 1000 elements: every matrix of the tiny presets is read and generated in several blocks
    monkeypatch.setattr(tensor_file, "CHUNK_ELEMENTS", 1000)


@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2-27b"])
def test_stored_random_weights_are_the_in_memory_ones(tmp_path, monkeypatch, small_chunks, preset):
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path))
    spec = PRESETS[preset]
    mem = random_weights(spec, seed=3)
    stored = weight_store.stored_random_weights(spec, seed=3)
    assert stored.stored and stored.source == mem.source
    assert stored.hash == mem.hash == stored._compute_hash()  # the hash written while generating is the real one
    for k in mem.tensors:
        np.testing.assert_array_equal(stored.tensors[k], mem.tensors[k])
    stored.check()
    again = weight_store.stored_random_weights(spec, seed=3)  # the second call reads the cache
    assert again.tensors.path == stored.tensors.path


def test_read_into_fills_any_dtype_and_row_range(tmp_path, small_chunks):
    spec = PRESETS["tiny-gemma"]
    mem = random_weights(spec, seed=0)
    w = load_weights(save_weights(mem, tmp_path / "w.safetensors"))
    name = "model.embed_tokens.weight"
    full = mem.tensors[name]
    out = np.empty((7, full.shape[1]), dtype=ml_dtypes.bfloat16)
    w.read_into(name, out, row0=5)
    np.testing.assert_array_equal(out.astype(np.float32), full[5:12])  # bf16-exact values survive
    out64 = np.empty(full.shape, dtype=np.float64)
    w.read_into(name, out64)
    np.testing.assert_array_equal(out64, full)
    np.testing.assert_array_equal(w.rows(name, [9, 0, 9]), full[[9, 0, 9]])
    with pytest.raises(ValueError, match="do not fit"):
        w.read_into(name, np.empty((3, full.shape[1] + 1), np.float32))


def test_bf16_rounding_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-30, 30, 100_000)).astype(np.float32)
    x[:4] = [0.0, -0.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8]  # exact ties round to even
    want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(weight_store.bf16_bits(x), want)


def test_truncated_store_is_refused(tmp_path):
    p = save_weights(random_weights(PRESETS["tiny-gemma"]), tmp_path / "w.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(ParityInputError, match="truncated"):
        load_weights(p)


def test_nan_in_a_stored_file_is_found_block_by_block(tmp_path, small_chunks):
    spec = PRESETS["tiny-gemma"]
    mem = random_weights(spec)
    mem.tensors["model.layers.1.mlp.down_proj.weight"][-1, -1] = np.nan  # in the last block only
    p = save_weights(mem, tmp_path / "w.safetensors")
    with pytest.raises(ParityInputError, match="down_proj.*1 NaN"):
        load_weights(p)


def test_stored_hash_is_computed_when_not_recorded(tmp_path):
    mem = random_weights(PRESETS["tiny-gemma"], seed=1)
    w = load_weights(save_weights(mem, tmp_path / "w.safetensors"))
    assert isinstance(w, Weights) and w.stored and w.hash == mem.hash
    assert w.tensors.nbytes_as(4) == 4 * sum(math.prod(t.shape) for t in mem.tensors.values())
