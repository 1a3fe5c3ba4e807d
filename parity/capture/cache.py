"""A bounded, in-process cache of what a run computes that does not depend on the implementation under test.

Runs that differ only in the implementation under test (the fault table: about 140 harness runs over a dozen
(spec, weights, prompts, dtype) combinations) recompute the same float64 reference traces, the same honest
ensemble and its noise model, and the same counterfactual captures. A `TraceCache` given as
`parity.harness.Request.cache` shares them; a run without one computes everything, as before.

What keeps it correct:

* The caller builds the key from everything the result depends on (`spec_key`, the weights' content hash, the
  prompts, the dtype, the modes...; see parity.harness and parity.diagnose.counterfactuals). The code of the
  port is not in the key: the cache lives in one process, where it does not change.
* Traces are frozen when stored: every tap array is made read-only, so an in-place edit anywhere raises
  instead of changing what later runs read. Each `traces()` call hands out new Trace objects (their taps,
  unavailable and effective dicts copied, the read-only arrays shared), so rebinding a field or adding a tap
  changes only the caller's copy.
* Only traces held in memory are stored: a trace read lazily from a file (separate processes) is never, since
  its file may be deleted; neither is a trace whose taps are reduced.
* Bounded: past `max_bytes` (the tap arrays' bytes) the least recently used entries are dropped.

Not thread-safe: one cache per process (a pytest-xdist worker has its own).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Hashable, Iterator, TypeVar

import numpy as np

from parity.capture.trace import Trace

T = TypeVar("T")
MAX_BYTES = 512 << 20  # 512 MiB: the whole fault table's shareable traces at tiny sizes take about a tenth of it
VALUE_BYTES = 64 << 10  # what a non-trace value (a noise model: a few hundred floats) is counted as
_MISSING = object()  # a stored value may be None (no noise model)


def spec_key(spec) -> str:
    """A GemmaSpec as a key: its dict, every field, in a fixed order."""
    return json.dumps(spec.to_dict(), sort_keys=True, default=repr)


def tokens_key(prompts: dict[str, list[int]]) -> tuple:
    """Prompts (name -> token ids) as a key, in their order (the traces come back in it)."""
    return tuple((name, tuple(int(i) for i in ids)) for name, ids in prompts.items())


def _storable(t: Trace) -> bool:
    return type(t.taps) is dict and all(type(v) is np.ndarray for v in t.taps.values())


def _freeze(t: Trace) -> None:
    for v in t.taps.values():
        v.flags.writeable = False


def _copy(t: Trace) -> Trace:
    """A new Trace over the same read-only arrays; its containers (a few small dicts) copied."""
    return dataclasses.replace(t, tokens=list(t.tokens), taps=dict(t.taps), unavailable=dict(t.unavailable),
                               effective=copy.deepcopy(t.effective), resources=dict(t.resources))


class TraceCache:
    """key -> traces (or another value), least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} is negative; give a byte count >= 0 (0 stores nothing)")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evicted = 0  # entries dropped to stay within max_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list:
        """The stored keys, least recently used first (each key's first item says what it holds)."""
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def traces(self, key: Hashable, make: Callable[[], list[Trace]]) -> list[Trace]:
        """The traces stored under `key`, or `make()`'s, stored when every one is held in memory; copies either
        way (the stored arrays read-only)."""
        got = self._get(key)
        if got is _MISSING:
            made = make()
            if not all(_storable(t) for t in made):
                return made
            for t in made:
                _freeze(t)
            got = tuple(made)
            self._put(key, got, sum(v.nbytes for t in got for v in t.taps.values()))
        return [_copy(t) for t in got]

    def value(self, key: Hashable, make: Callable[[], T], copy_of: Callable[[T], T], nbytes: int = VALUE_BYTES) -> T:
        """Any other value (the noise model): stored as made, handed out through `copy_of` so no caller edits it."""
        got = self._get(key)
        if got is _MISSING:
            got = make()
            self._put(key, got, nbytes)
        return copy_of(got)

    def _get(self, key: Hashable):
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return _MISSING
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    def _put(self, key: Hashable, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return  # larger than the whole cache: computed again next time rather than emptying it
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, n) = self._entries.popitem(last=False)
            self.bytes -= n
            self.evicted += 1

    def __repr__(self) -> str:
        return (f"TraceCache({len(self)} entries, {self.bytes / 2**20:.1f} of {self.max_bytes / 2**20:.0f} MiB, "
                f"{self.hits} hits, {self.misses} misses, {self.evicted} evicted)")


# the cache of the run being diagnosed: the harness sets it around diagnose(), where the counterfactual searches
# read it (their captures depend on the candidate, not on the implementation under test)
_ACTIVE: ContextVar[TraceCache | None] = ContextVar("parity_trace_cache", default=None)


@contextmanager
def using(cache: TraceCache | None) -> Iterator[None]:
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> TraceCache | None:
    """The cache of the run being diagnosed (None: none given, or outside a run)."""
    return _ACTIVE.get()
