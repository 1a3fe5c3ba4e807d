"""A trace: what one implementation computed at every tap, plus where it came from.

Saved as safetensors (tap -> array, metadata as JSON) so capture and
comparison can run in different processes or on different machines. Low
precision taps are stored widened to float32, which holds every bf16/fp16
value exactly; `dtype` records what they were.

Real sizes make a trace large (Gemma-2B, 128 tokens, float64: ~1.8 GB; the
logits alone are 128 x 256000), hence two things:

* `load_trace(path, lazy=True)` gives `Trace.taps` as a read-only mapping that
  reads each tap from the file when asked and keeps nothing, so a comparison
  holds one pair of taps at a time. `Trace.save` writes tap by tap.
* `Trace.save(path, reduce_over=n)` stores each tap of more than n elements
  reduced (`ReducedTap`): up to 16 whole rows along the first (token) axis,
  per-row max |x|, RMS and non-finite counts for every row, the logits' top-5
  ids for every position, and the full tensor's RMS and max |x|. In the file a
  reduced tap T is the tensors `T::rows`, `T::row_index`, `T::row_max_abs`,
  `T::row_rms`, `T::row_nonfinite` (and `T::top_ids` for logits), plus an
  entry in the parity_trace metadata's `reduced` dict with its full shape and
  whole-tensor numbers. The price: an error confined to unsampled rows is seen
  only through those statistics (see parity.compare.pairs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.errors import ParityInputError
from parity.numerics.metrics import rms, row_stats, top_ids
from parity.model.tensor_file import TensorFile, write_safetensors

MAX_ROWS = 16  # whole rows a reduced tap keeps
TOP_K = 5  # logits ids kept per position
SEP = "::"  # reduced tap T is stored as T::rows, T::row_index, ...
_FIX = "capture it again"  # what a bad trace file's message tells the user to do


@dataclass(frozen=True, eq=False)
class ReducedTap:
    """A tap stored reduced: some whole rows, statistics of every row, and of the whole tensor."""

    shape: tuple[int, ...]  # of the full tensor
    rows: np.ndarray  # [R, *shape[1:]], the full tensor's rows `row_index`
    row_index: np.ndarray  # [R] int64, ascending
    row_max_abs: np.ndarray  # [shape[0]] float64, max |x| over each row's finite values
    row_rms: np.ndarray  # [shape[0]] float64, RMS over each row's finite values
    row_nonfinite: np.ndarray  # [shape[0]] int64, how many values of each row are inf or NaN
    top_ids: np.ndarray | None  # [shape[0], 5] int64, largest first (logits only)
    rms: float  # of the full tensor's finite values (parity.numerics.metrics.rms)
    max_abs: float  # of the full tensor's finite values
    numel: int
    nan_count: int = 0  # NaNs in the full tensor

    @property
    def size(self) -> int:
        return self.numel

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def parts(self) -> dict[str, np.ndarray]:
        """The arrays stored for it, by the suffix after `T::`."""
        out = {"rows": self.rows, "row_index": self.row_index, "row_max_abs": self.row_max_abs,
               "row_rms": self.row_rms, "row_nonfinite": self.row_nonfinite}
        if self.top_ids is not None:
            out["top_ids"] = self.top_ids
        return out

    def meta(self) -> dict:
        return {"shape": list(self.shape), "numel": self.numel, "rms": self.rms, "max_abs": self.max_abs,
                "nan_count": self.nan_count, "top_ids": self.top_ids is not None}


def row_indices(n_rows: int, max_rows: int = MAX_ROWS) -> np.ndarray:
    """The rows a reduced tap keeps: all of them, or the first, the last and evenly spaced ones between.

    A function of the number of rows only, so two traces of the same prompt keep the same rows.
    """
    if max_rows < 2:
        raise ValueError(f"max_rows={max_rows}: keep at least 2 rows (the first and the last)")
    if n_rows <= max_rows:
        return np.arange(n_rows, dtype=np.int64)
    # the spacing is (n_rows - 1) / (max_rows - 1) > 1, so the rounded positions are distinct
    return np.rint(np.linspace(0, n_rows - 1, max_rows)).astype(np.int64)


def reduce_tap(name: str, array: np.ndarray, max_rows: int = MAX_ROWS) -> ReducedTap:
    """`array` (widened as a saved trace widens it) reduced to `row_indices(len(array), max_rows)`."""
    a = widen(np.asarray(array))
    if a.ndim == 0:
        raise ValueError(f"tap {name!r} is a scalar: nothing to reduce")
    return reduce_at(name, a, row_indices(a.shape[0], max_rows))


def reduce_at(name: str, array: np.ndarray, row_index: np.ndarray) -> ReducedTap:
    """`array` reduced to the given rows (ascending), with every row's statistics."""
    a = widen(np.asarray(array))
    idx = np.asarray(row_index, dtype=np.int64)
    row_max_abs, row_rms, nonfinite, nans = row_stats(a)
    return ReducedTap(
        shape=tuple(int(n) for n in a.shape), rows=np.ascontiguousarray(a[idx]), row_index=idx,
        row_max_abs=row_max_abs, row_rms=row_rms, row_nonfinite=nonfinite,
        top_ids=top_ids(a, TOP_K) if name == "logits" and a.ndim == 2 else None,
        rms=rms(a), max_abs=float(row_max_abs.max()) if row_max_abs.size else 0.0, numel=int(a.size),
        nan_count=int(nans.sum()),
    )


class LazyTaps(Mapping):
    """Read-only `tap -> array | ReducedTap` over a trace file, in forward order.

    Each access opens the file and reads that tap; nothing is kept, so the file must stay where it is.
    """

    def __init__(self, path: str | Path, order: list[str], reduced: dict[str, dict]):
        self._path, self._order, self._reduced = str(path), tuple(order), dict(reduced)
        self._names = frozenset(self._order)

    def __getitem__(self, name: str) -> np.ndarray | ReducedTap:
        if name not in self._names:
            raise KeyError(name)
        return _read_tap(TensorFile(self._path, _FIX), name, self._reduced.get(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    @property
    def path(self) -> Path:
        return Path(self._path)

    def __repr__(self) -> str:
        return f"LazyTaps({self._path!r}, {len(self)} taps)"

    def layout(self, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        """Shape and dtype of a whole stored tap without reading it; None for a reduced one."""
        if name in self._reduced:
            return None
        return TensorFile(self._path, _FIX).layout(name)


@dataclass
class Trace:
    impl: str
    version: str
    dtype: str
    spec: dict
    weights_hash: str
    tokens: list[int]
    prompt: str = "prompt"
    mode: str = "cumulative"
    prefill: int | None = None  # decode traces: the prompt's length (row s is position prefill + s)
    # forward order; a dict, or a LazyTaps from load_trace(lazy=True); values may be ReducedTap
    taps: Mapping[str, np.ndarray | ReducedTap] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # tap -> why this impl cannot give it
    effective: dict = field(default_factory=dict)  # what the built model actually computes
    resources: dict = field(default_factory=dict, compare=False)  # its capture's wall time, peak RSS (not saved)
    # a quantized run's held reference (parity.compare.held.saved): which held weights, rounding and runs it is,
    # with what re-judging saved traces needs; None: an ordinary trace
    held: dict | None = None

    @property
    def label(self) -> str:
        return f"{self.impl}@{self.dtype}"

    def meta(self) -> dict:
        return {
            "impl": self.impl, "version": self.version, "dtype": self.dtype, "spec": self.spec,
            "weights_hash": self.weights_hash, "tokens": self.tokens, "prompt": self.prompt,
            "mode": self.mode, "prefill": self.prefill, "order": list(self.taps), "unavailable": self.unavailable,
            "effective": self.effective, **({"held": self.held} if self.held is not None else {}),
        }

    def save(self, path: str | Path, reduce_over: int | None = None, keep: Iterable[str] = ()) -> Path:
        """Write the trace, tap by tap; taps of more than `reduce_over` elements (and ReducedTaps) reduced,
        except those named in `keep` (the full tensor kept where asked).

        A whole tap is read only when its turn to be written comes (a LazyTaps gives its shape and dtype
        without reading it), so one is in memory at a time; taps to reduce are reduced first, and their
        parts (no more than the file will hold) kept until written.
        """
        if reduce_over is not None and reduce_over < 0:
            raise ValueError(f"reduce_over={reduce_over}: give an element count >= 0, or None to keep every tap whole")
        p = Path(path)
        entries, reduced, keep = [], {}, set(keep)
        for name in self.taps:
            lay = _layout(self.taps, name)
            big = reduce_over is not None and lay is not None and lay[0] and math.prod(lay[0]) > reduce_over
            if lay is not None and (not big or name in keep):
                entries.append((name, lay[0], lay[1], lambda name=name: widen(np.asarray(self.taps[name]))))
                continue
            if SEP in name:
                raise ValueError(f"tap {name!r}: {SEP!r} is reserved for the parts of reduced taps; rename the tap")
            red = self.taps[name] if lay is None else reduce_tap(name, self.taps[name])
            reduced[name] = red.meta()
            entries += [(name + SEP + k, v.shape, v.dtype, lambda v=v: v) for k, v in red.parts().items()]
        meta = self.meta()
        if reduced:
            meta["reduced"] = reduced
        return write_safetensors(p, entries, {"parity_trace": json.dumps(meta)}, checksum=True)


def widen(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float64:
        return a
    return a.astype(np.float32, copy=False)


def _layout(taps: Mapping, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and stored (widened) dtype of a whole tap, None for a ReducedTap; reads nothing from a file."""
    if isinstance(taps, LazyTaps):
        return taps.layout(name)
    v = taps[name]
    if isinstance(v, ReducedTap):
        return None
    v = np.asarray(v)
    return v.shape, np.dtype(np.float64 if v.dtype == np.float64 else np.float32)


def _stored_names(name: str, red: dict | None) -> list[str]:
    if red is None:
        return [name]
    parts = ["rows", "row_index", "row_max_abs", "row_rms", "row_nonfinite"] + (["top_ids"] if red["top_ids"] else [])
    return [name + SEP + k for k in parts]


def _read_tap(f, name: str, red: dict | None) -> np.ndarray | ReducedTap:
    if red is None:
        return f.get_tensor(name)
    part = {n.split(SEP)[-1]: f.get_tensor(n) for n in _stored_names(name, red)}
    return ReducedTap(shape=tuple(red["shape"]), rows=part["rows"], row_index=part["row_index"],
                      row_max_abs=part["row_max_abs"], row_rms=part["row_rms"], row_nonfinite=part["row_nonfinite"],
                      top_ids=part.get("top_ids"), rms=float(red["rms"]), max_abs=float(red["max_abs"]),
                      numel=int(red["numel"]), nan_count=int(red["nan_count"]))


def load_trace(path: str | Path, lazy: bool = False) -> Trace:
    """A saved trace; with lazy=True its taps are read from the file when asked for (LazyTaps)."""
    p = Path(path)
    if not p.is_file():
        raise ParityInputError(f"trace {str(p)!r} does not exist; give a file written by parity capture")
    try:
        f = TensorFile(p, _FIX)
        meta = json.loads(f.metadata["parity_trace"])
        order, reduced = meta.pop("order"), meta.pop("reduced", {})
        missing = [n for k in order for n in _stored_names(k, reduced.get(k)) if n not in f]
        if missing:
            raise ParityInputError(f"{p}: tensors {missing[:3]} of the trace are not in the file "
                                   f"({len(missing)} missing); capture it again")
        f.verify()  # before any number is read: a corrupt file is bad input, never a divergence
        taps = LazyTaps(p, order, reduced) if lazy else {k: _read_tap(f, k, reduced.get(k)) for k in order}
    except ParityInputError:
        raise
    except (KeyError, json.JSONDecodeError):
        raise ParityInputError(f"{p}: a safetensors file but not a parity trace (no parity_trace metadata)") from None
    except Exception as e:
        raise ParityInputError(f"{p}: not a readable trace ({e}); capture it again") from None
    t = Trace(**meta)
    t.taps = taps
    return t
