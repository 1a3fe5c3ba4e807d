"""The one safetensors codec: what it writes reads back equal, through it and through the safetensors package."""

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from parity.model import tensor_file
from parity.errors import ParityInputError
from parity.model.tensor_file import StoredTensors, TensorFile, write_safetensors

RNG = np.random.default_rng(0)
ARRAYS = {
    "bf16": RNG.normal(size=(4, 3)).astype(ml_dtypes.bfloat16),
    "fp16": RNG.normal(size=(5, 2)).astype(np.float16),
    "fp32": RNG.normal(size=(3, 2, 2)).astype(np.float32),
    "fp64": RNG.normal(size=(7,)),
    "int64": RNG.integers(-2**62, 2**62, size=(2, 3)),
    "scalar": np.array(1.5, np.float32),
    "empty": np.zeros((0, 4), np.float32),
}


def _write(path, arrays=ARRAYS, metadata=None, **kw):
    return write_safetensors(path, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()], metadata, **kw)


def test_round_trip_in_every_dtype_with_metadata(tmp_path):
    f = TensorFile(_write(tmp_path / "x.safetensors", metadata={"note": "héllo", "n": 3}))
    assert list(f.keys()) == list(ARRAYS) and f.metadata == {"note": "héllo", "n": "3"}
    for k, v in ARRAYS.items():
        got = f.get_tensor(k)
        assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v), k
        assert f.layout(k) == (v.shape, v.dtype)
        got[...] = 0  # a fresh array: writing to it leaves the next read alone
        assert np.array_equal(f.get_tensor(k), v)
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*"))


def test_the_safetensors_package_reads_what_it_writes(tmp_path):
    arrays = {k: v for k, v in ARRAYS.items() if k != "bf16"}  # numpy has no bfloat16 for safe_open to give
    with safe_open(str(_write(tmp_path / "x.safetensors", arrays, {"a": "b"})), framework="numpy") as f:
        assert f.metadata() == {"a": "b"}
        for k, v in arrays.items():
            assert np.array_equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype, k


def test_float_reads_widen_exactly_and_read_one_tensor_lazily(tmp_path, monkeypatch):
    monkeypatch.setattr(tensor_file, "CHUNK_ELEMENTS", 4)  # several row blocks per tensor
    floats = {k: ARRAYS[k] for k in ("bf16", "fp16", "fp32")}
    st = StoredTensors(_write(tmp_path / "x.safetensors", floats))
    assert len(st) == 3 and "fp16" in st and "nope" not in st
    for k, v in floats.items():
        assert st[k].dtype == np.float32 and np.array_equal(st[k], v.astype(np.float32)), k
    assert np.array_equal(st.rows("bf16", [3, 0]), floats["bf16"][[3, 0]].astype(np.float32))
    out = np.empty((2, 3), ml_dtypes.bfloat16)
    st.read_into("bf16", out, row0=2)
    assert np.array_equal(out.view(np.uint16), floats["bf16"][2:].view(np.uint16))  # bits copied, not converted
    assert np.array_equal(np.concatenate([b for _, b in st.blocks("fp32")]), floats["fp32"])
    with pytest.raises(KeyError):
        st["nope"]


def test_a_tensor_streamed_in_row_blocks_and_late_metadata(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(6, 2)
    p = write_safetensors(tmp_path / "x.safetensors", [("a", a.shape, a.dtype, lambda: iter([a[:4], a[4:]]))],
                          {"hash": "0" * 8, "kept": "yes"}, late_metadata=lambda: {"hash": "12345678"})
    f = TensorFile(p)
    assert np.array_equal(f.get_tensor("a"), a) and f.metadata == {"hash": "12345678", "kept": "yes"}
    with pytest.raises(ValueError, match="6 announced"):
        write_safetensors(tmp_path / "y.safetensors", [("a", a.shape, a.dtype, lambda: iter([a[:4]]))])
    with pytest.raises(ValueError, match="length"):
        write_safetensors(tmp_path / "y.safetensors", [("a", a.shape, a.dtype, lambda: a)], {"hash": "0"},
                          late_metadata=lambda: {"hash": "12345678"})
    assert not (tmp_path / "y.safetensors").exists() and not list(tmp_path.glob(".*.part"))


def test_bad_files_are_one_line_input_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01junk")
    with pytest.raises(ParityInputError, match="not a readable safetensors file.*re-export"):
        TensorFile(tmp_path / "junk.safetensors")
    data = _write(tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ParityInputError, match="'int64' is truncated or its header is corrupt; capture it again"):
        TensorFile(tmp_path / "cut.safetensors", fix="capture it again")
    with pytest.raises(ParityInputError, match="'int64' is stored as I64"):
        StoredTensors(tmp_path / "x.safetensors")  # weights are floating point
    with pytest.raises(ParityInputError, match="stored as I64"):
        TensorFile(tmp_path / "x.safetensors").float32("int64")
