"""Lazy traces, the streaming safetensors writer, reduced taps and comparing them. numpy + safetensors only."""

import json
import struct
import tracemalloc
from collections.abc import Mapping

import numpy as np
import pytest
from safetensors import safe_open

from parity.compare.pairs import compare_trace
from parity.errors import ParityInputError
from parity.numerics.metrics import rms, row_norms
from parity.capture.trace import ReducedTap, Trace, load_trace, reduce_at, reduce_tap, row_indices, write_safetensors

T, HIDDEN, VOCAB = 40, 8, 50  # 40 tokens: more than the 16 rows a reduced tap keeps
ROWS = row_indices(T)
UNSAMPLED = int(np.setdiff1d(np.arange(T), ROWS)[0])
REDUCE_OVER = 100  # every tap below is bigger


def _taps(seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(2, T, T))
    scores[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf  # masked, as attention scores are
    return {"embed": rng.normal(size=(T, HIDDEN)), "layers.0.attn.scores": scores,
            "layers.0.out": rng.normal(size=(T, HIDDEN)), "final_norm": rng.normal(size=(T, HIDDEN)),
            "logits": 3 * rng.normal(size=(T, VOCAB))}


def _trace(taps, impl="ref", dtype="float64"):
    return Trace(impl=impl, version="0", dtype=dtype, spec={"num_layers": 2}, weights_hash="w",
                 tokens=list(range(T)), taps=taps)


def _compare(ref_taps, other_taps, dtype="float64"):
    return {r.tap: r for r in compare_trace(_trace(ref_taps), _trace(other_taps, "other", dtype))}


def _reduced(taps):
    return {k: reduce_tap(k, v) for k, v in taps.items()}


# ------------------------------------------------------------------------------------------------ lazy


def test_lazy_load_gives_the_eager_arrays_in_order(tmp_path):
    path = _trace(_taps()).save(tmp_path / "t.safetensors")
    eager, lazy = load_trace(path), load_trace(path, lazy=True)
    assert isinstance(eager.taps, dict) and not isinstance(lazy.taps, dict) and isinstance(lazy.taps, Mapping)
    assert list(lazy.taps) == list(eager.taps) == list(_taps()) and len(lazy.taps) == len(eager.taps)
    assert "logits" in lazy.taps and "nope" not in lazy.taps and lazy.taps.get("nope") is None
    for k, v in lazy.taps.items():
        assert np.array_equal(v, eager.taps[k]) and v.dtype == eager.taps[k].dtype, k
    assert lazy.meta() == eager.meta()
    with pytest.raises(KeyError):
        lazy.taps["nope"]
    with pytest.raises(TypeError):
        lazy.taps["embed"] = np.zeros(1)  # read-only


def test_lazy_taps_read_the_file_on_each_access(tmp_path):
    path = tmp_path / "t.safetensors"
    _trace(_taps(0)).save(path)
    eager, lazy = load_trace(path), load_trace(path, lazy=True)
    assert np.array_equal(lazy.taps["embed"], _taps(0)["embed"])
    _trace(_taps(1)).save(path)  # same layout, other values, under the same name
    assert np.array_equal(lazy.taps["embed"], _taps(1)["embed"])  # read again, nothing kept from before
    assert np.array_equal(eager.taps["embed"], _taps(0)["embed"])  # the eager load did read at load time


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_lazy_compare_and_save_hold_one_tap_pair_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    taps = {f"layers.{i}.out": rng.normal(size=(64, 256)) for i in range(30)}
    path = _trace(taps).save(tmp_path / "t.safetensors")
    total = 2 * sum(a.nbytes for a in taps.values())  # both traces, whole

    def compare(lazy):
        ref, other = load_trace(path, lazy=lazy), load_trace(path, lazy=lazy)
        other.impl = "other"
        assert all(r.passed for r in compare_trace(ref, other))

    assert _peak_bytes(lambda: compare(False)) > total  # eager: every tap of both traces in memory
    assert _peak_bytes(lambda: compare(True)) < total / 3
    lazy = load_trace(path, lazy=True)
    assert _peak_bytes(lambda: lazy.save(tmp_path / "again.safetensors")) < total / 6
    # reducing keeps the reduced parts (what the file will hold: 16 of 64 rows here) until they are written
    assert _peak_bytes(lambda: lazy.save(tmp_path / "reduced.safetensors", reduce_over=100)) < total / 3


def test_a_trace_missing_a_listed_tensor_is_bad_input(tmp_path):
    meta = _trace({}).meta() | {"order": ["embed", "logits"]}
    a = np.zeros((2, 3))
    write_safetensors(tmp_path / "t.safetensors", [("embed", a.shape, a.dtype, lambda: a)],
                      {"parity_trace": json.dumps(meta)})
    for lazy in (False, True):
        with pytest.raises(ParityInputError, match="'logits'.* not in the file"):
            load_trace(tmp_path / "t.safetensors", lazy=lazy)


def test_resaving_a_lazy_trace_elsewhere_and_over_itself(tmp_path):
    path = _trace(_taps()).save(tmp_path / "a.safetensors", reduce_over=T * HIDDEN)  # scores and logits reduced
    lazy = load_trace(path, lazy=True)
    for target in (tmp_path / "b.safetensors", path):
        back = load_trace(lazy.save(target))
        assert back.meta() == lazy.meta() and not list(tmp_path.glob("*.part"))
        assert np.array_equal(back.taps["embed"], _taps()["embed"])
        assert isinstance(back.taps["logits"], ReducedTap)
        assert np.array_equal(back.taps["logits"].rows, _taps()["logits"][ROWS])


class _FailsOnSecondRead(dict):
    def __init__(self, *a):
        super().__init__(*a)
        self.reads = 0

    def __getitem__(self, k):
        self.reads += 1
        if self.reads > 1:
            raise RuntimeError("disk gone")
        return super().__getitem__(k)


def test_a_failed_save_leaves_no_file(tmp_path):
    t = _trace(_FailsOnSecondRead({"embed": np.zeros((2, 2))}))
    with pytest.raises(RuntimeError, match="disk gone"):
        t.save(tmp_path / "t.safetensors")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- writer


def test_streaming_writer_round_trips_through_safe_open(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.normal(size=(3, 5)).astype(np.float32), "f64": rng.normal(size=(7,)),
              "i64": rng.integers(-2**62, 2**62, size=(2, 2, 3)), "scalar": np.array(2.5),
              "empty": np.zeros((0, 4), np.float32), "big_endian": np.arange(6, dtype=">f8").reshape(2, 3),
              "strided": rng.normal(size=(6, 4))[::2, ::-1]}
    write_safetensors(tmp_path / "x.safetensors", [(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()],
                      {"note": "héllo"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(arrays) and f.metadata() == {"note": "héllo"}
        for k, v in arrays.items():
            got = f.get_tensor(k)
            assert got.shape == v.shape and got.dtype.name == v.dtype.name and np.array_equal(got, v), k
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and raw[8:9] == b"{" and raw[8:8 + n].decode().rstrip(" ").endswith("}")


@pytest.mark.parametrize("entry,match", [
    (("a", (2,), np.float32, lambda: np.zeros(3, np.float32)), "when announced"),
    (("a", (2,), np.float32, lambda: np.zeros(2, np.float64)), "when announced"),
    (("a", (2,), np.complex64, lambda: np.zeros(2, np.complex64)), "no safetensors code"),
    (("__metadata__", (2,), np.float32, lambda: np.zeros(2, np.float32)), "reserved"),
])
def test_streaming_writer_refuses_bad_entries(tmp_path, entry, match):
    with pytest.raises(ValueError, match=match):
        write_safetensors(tmp_path / "x.safetensors", [entry])


def test_streaming_writer_refuses_a_name_twice(tmp_path):
    e = ("a", (1,), np.float32, lambda: np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="twice"):
        write_safetensors(tmp_path / "x.safetensors", [e, e])


# ---------------------------------------------------------------------------------------------- reduce


def test_row_indices_depend_on_the_row_count_only():
    assert ROWS.tolist() == row_indices(T).tolist() and len(ROWS) == 16
    assert ROWS[0] == 0 and ROWS[-1] == T - 1 and np.all(np.diff(ROWS) > 0)
    assert np.all(np.diff(ROWS) <= int(np.ceil((T - 1) / 15)))  # evenly spaced
    assert row_indices(10).tolist() == list(range(10))
    with pytest.raises(ValueError, match="at least 2"):
        row_indices(10, max_rows=1)


def test_reduce_tap_keeps_rows_row_statistics_and_top_ids():
    a = _taps()["logits"]
    a[3, 7] = np.nan
    r = reduce_tap("logits", a)
    assert r.shape == a.shape and r.numel == a.size and r.row_index.tolist() == ROWS.tolist()
    assert np.array_equal(r.rows, a[ROWS], equal_nan=True)
    fin = np.where(np.isfinite(a), a, 0.0)
    n_fin = np.isfinite(a).sum(axis=1)
    assert np.allclose(r.row_max_abs, np.abs(fin).max(axis=1))
    assert np.allclose(r.row_rms, np.sqrt((fin**2).sum(axis=1) / n_fin))
    assert r.row_nonfinite.tolist() == [int(i == 3) for i in range(T)] and r.nan_count == 1
    assert r.rms == rms(a) and r.max_abs == np.abs(fin).max()
    want = np.argsort(-np.where(np.isnan(a), -np.inf, a), axis=1, kind="stable")[:, :5]
    assert r.top_ids.dtype == np.int64 and np.array_equal(r.top_ids, want)
    assert reduce_tap("embed", _taps()["embed"]).top_ids is None  # top ids for logits only


def test_top_ids_break_ties_by_lower_index():
    a = np.zeros((T, VOCAB))
    a[:, [9, 4, 30]] = 1.0
    assert reduce_tap("logits", a).top_ids[0].tolist() == [4, 9, 30, 0, 1]


def test_reduce_refuses_what_it_cannot_reduce(tmp_path):
    with pytest.raises(ValueError, match="scalar"):
        reduce_tap("x", np.array(1.0))
    with pytest.raises(ValueError, match="reduce_over"):
        _trace(_taps()).save(tmp_path / "t.safetensors", reduce_over=-1)
    with pytest.raises(ValueError, match="reserved"):
        _trace({"a::b": np.zeros((T, HIDDEN))}).save(tmp_path / "t.safetensors", reduce_over=1)


def test_save_reduces_only_taps_over_the_limit(tmp_path):
    taps = _taps() | {"small": np.arange(6.0).reshape(3, 2), "scalar": np.array(3.0)}
    path = _trace(taps).save(tmp_path / "t.safetensors", reduce_over=T * HIDDEN)
    with safe_open(str(path), framework="numpy") as f:
        names = set(f.keys())
        meta = json.loads(f.metadata()["parity_trace"])
    assert {"logits::rows", "logits::row_index", "logits::row_max_abs", "logits::row_rms", "logits::row_nonfinite",
            "logits::top_ids", "layers.0.attn.scores::rows", "embed", "small", "scalar"} <= names
    assert "logits" not in names and "layers.0.attn.scores::top_ids" not in names
    assert set(meta["reduced"]) == {"logits", "layers.0.attn.scores"}
    assert meta["reduced"]["logits"]["shape"] == [T, VOCAB] and meta["order"] == list(taps)
    for lazy in (False, True):
        back = load_trace(path, lazy=lazy)
        assert list(back.taps) == list(taps)
        assert isinstance(back.taps["logits"], ReducedTap) and isinstance(back.taps["embed"], np.ndarray)
        assert back.taps["scalar"].shape == () and back.taps["logits"].rms == rms(taps["logits"])
        assert np.array_equal(back.taps["logits"].top_ids, reduce_tap("logits", taps["logits"]).top_ids)


# --------------------------------------------------------------------------------------------- compare


def test_identical_reduced_traces_pass_sampled(tmp_path):
    path = _trace(_taps()).save(tmp_path / "t.safetensors", reduce_over=REDUCE_OVER)
    a, b = load_trace(path, lazy=True), load_trace(path)
    b.impl = "other"
    rs = compare_trace(a, b)
    assert [r.tap for r in rs] == list(_taps()) and all(r.passed and r.sampled for r in rs)
    r = {r.tap: r for r in rs}["logits"]
    assert r.numel == T * VOCAB and r.sampled_numel == 16 * VOCAB and r.mismatched == 0 and r.stat_rows_failed == 0
    assert r.logits["kl_mean"] == 0 and r.logits["top1_agree"] == 1.0
    assert r.logits["kl_rows"] == 16 and r.logits["top1_positions"] == T
    j = r.to_json()
    assert {"max_abs", "max_rel", "atol", "rtol", "passed", "tap", "layer", "impl", "dtype", "mode"} <= set(j)
    assert j["sampled"] is True and j["sampled_numel"] == 16 * VOCAB and j["numel"] == T * VOCAB


def test_unreduced_results_say_so():
    r = _compare(_taps(), _taps())["embed"]
    assert r.passed and not r.sampled and r.sampled_numel == r.numel == T * HIDDEN and r.reason == ""
    assert "sampled" not in r.message() and "logits" not in r.to_json() and "kl_rows" not in _compare(
        _taps(), _taps())["logits"].logits


def test_a_fault_in_a_sampled_row_is_caught_where_it_is():
    row = int(ROWS[5])
    bad = _taps()
    bad["layers.0.out"][row, 3] += 1e-3
    full = _compare(_taps(), bad)["layers.0.out"]
    for ref, other in ((_reduced(_taps()), _reduced(bad)), (_taps(), _reduced(bad)), (_reduced(_taps()), bad)):
        r = _compare(ref, other)["layers.0.out"]
        assert not r.passed and r.sampled and r.mismatched == 1
        assert r.where == full.where == [row, 3]  # full-tensor coordinates, not the 5th sampled row
        assert r.max_abs == full.max_abs and "sampled elements (of 320)" in r.message()


def test_full_against_reduced_either_way_passes_when_equal():
    for ref, other in ((_taps(), _reduced(_taps())), (_reduced(_taps()), _taps())):
        rs = _compare(ref, other)
        assert all(r.passed and r.sampled for r in rs.values())
        assert rs["logits"].sampled_numel == 16 * VOCAB and rs["layers.0.attn.scores"].sampled_numel == 2 * T * T
        assert rs["logits"].logits["top1_positions"] == T and rs["logits"].logits["top1_agree"] == 1.0


def test_reduced_atol_is_the_full_comparisons():
    full, red = _compare(_taps(), _taps(), "float32"), _compare(_reduced(_taps()), _reduced(_taps()), "float32")
    for tap in full:
        assert red[tap].atol == full[tap].atol, tap
        assert red[tap].ref_rms == pytest.approx(full[tap].ref_rms, rel=1e-12), tap
    # what a reduced comparison would get wrong by taking the RMS of the rows it has:
    assert rms(_taps()["embed"][ROWS]) != rms(_taps()["embed"])


def test_a_small_fault_in_an_unsampled_row_is_not_caught():
    # The documented price of reduction: the full comparison fails, the reduced one cannot see it, because the
    # row is not kept and its max |x| and RMS move by far less than the tolerance allows (the fault is 5 x atol
    # on the row's smallest value: it leaves the max alone and moves the RMS by ~(5 atol)^2 / (2 n rms)).
    bad = _taps()
    col = int(np.argmin(np.abs(bad["layers.0.out"][UNSAMPLED])))
    full = _compare(_taps(), bad, "float32")["layers.0.out"]
    bad["layers.0.out"][UNSAMPLED, col] += 5 * full.atol
    full = _compare(_taps(), bad, "float32")["layers.0.out"]
    assert not full.passed and full.where == [UNSAMPLED, col]
    r = _compare(_reduced(_taps()), _reduced(bad), "float32")["layers.0.out"]
    assert r.passed and r.stat_rows_failed == 0


def test_a_large_fault_in_an_unsampled_row_fails_on_its_row_statistics():
    bad = _taps()
    bad["layers.0.out"][UNSAMPLED, 2] += 1.0
    r = _compare(_reduced(_taps()), _reduced(bad))["layers.0.out"]
    assert r.mismatched == 0  # the sampled rows agree
    assert not r.passed and r.stat_rows_failed == 1 and f"row {UNSAMPLED}" in r.reason
    assert r.needed_atol > r.atol and r.reason in r.message()


@pytest.mark.parametrize("value,what", [(np.nan, "NaN in 1 element"), (np.inf, "non-finite 1 vs 0")])
def test_a_non_finite_value_in_an_unsampled_row_fails(value, what):
    bad = _taps()
    bad["final_norm"][UNSAMPLED, 0] = value
    r = _compare(_reduced(_taps()), _reduced(bad))["final_norm"]
    assert not r.passed and what in r.reason


def test_statistics_check_never_fails_what_the_full_comparison_passes():
    rng = np.random.default_rng(1)
    ref = _taps()
    full = _compare(ref, ref, "float32")
    for trial in range(20):
        other = {}
        for tap, a in ref.items():  # errors up to just inside the elementwise bound, each row by its own RMS
            allowed = full[tap].bound * row_norms(a) + full[tap].rtol * np.abs(a)
            other[tap] = a + np.where(np.isfinite(a), 0.999 * rng.uniform(-1, 1, a.shape) * allowed, 0.0)
        assert all(r.passed for r in _compare(ref, other, "float32").values()), trial
        assert all(r.passed for r in _compare(_reduced(ref), _reduced(other), "float32").values()), trial


def test_an_argmax_changed_in_an_unsampled_row_shows_in_top1_agree():
    bad = _taps()
    row = bad["logits"][UNSAMPLED]
    first, second = np.argsort(-row)[:2]
    row[[first, second]] = row[[second, first]]  # same values, same max |x| and RMS, another argmax
    for ref, other in ((_reduced(_taps()), _reduced(bad)), (_taps(), _reduced(bad)), (_reduced(_taps()), bad)):
        r = _compare(ref, other)["logits"]
        assert r.passed  # nothing else in the reduced logits can see a swap in a row it does not keep
        assert r.logits["top1_agree"] == pytest.approx((T - 1) / T) and r.logits["top1_positions"] == T


def test_different_rows_compare_on_the_rows_in_common():
    a = _taps()["embed"]
    ref, other = reduce_tap("embed", a), reduce_tap("embed", a, max_rows=8)
    common = np.intersect1d(ref.row_index, other.row_index)
    assert 0 < len(common) < 8
    r = _compare({"embed": ref}, {"embed": other})["embed"]
    assert r.passed and r.sampled_numel == len(common) * HIDDEN


def test_no_rows_in_common_fails_with_a_reason():
    a = _taps()["embed"]
    r = _compare({"embed": reduce_at("embed", a, [1, 2])}, {"embed": reduce_at("embed", a, [3])})["embed"]
    assert not r.passed and r.sampled and r.sampled_numel == 0 and r.numel == a.size
    assert "no rows in common" in r.reason and r.message().endswith(r.reason)


def test_mismatched_shapes_fail_cleanly():
    short = {k: v[:-1] for k, v in _taps().items()}
    for ref, other in ((_reduced(_taps()), short), (_taps(), _reduced(short)), (_reduced(_taps()), _reduced(short))):
        for r in _compare(ref, other).values():
            assert not r.passed and r.sampled and r.sampled_numel == 0 and r.mismatched == r.numel
            assert "!= reference shape" in r.reason
    r = _compare(_taps(), short)["embed"]  # whole arrays, as before
    assert not r.passed and not r.sampled and r.numel == r.mismatched == T * HIDDEN and r.max_abs == np.inf
    assert f"shape ({T - 1}, {HIDDEN}) != reference shape ({T}, {HIDDEN})" in r.message()
