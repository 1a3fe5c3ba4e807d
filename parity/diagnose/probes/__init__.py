"""Probes: look at one operation of one implementation, on its own captured input and output.

Each topic module registers its probes (`register(ProbeSpec(...))`) with the cause
ids they can name; `run_probes` runs every registered probe on a trace, in the
forward order of the taps they report on. A probe returns a `Probe` whose
`status` ("ok", "cause", "cannot-tell") is set where it decides.

To add a probe: a module here that registers it (every module of this package
whose name does not start with "_" is imported, in name order), and its fault in
tests/faults.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Mapping

from parity.capture.trace import ReducedTap, Trace
from parity.diagnose.probes._context import MATMUL_INPUT, matmul_input  # noqa: F401 -- probes import it there
from parity.diagnose.probes._evidence import (STATUSES, Candidate, Probe, ProbeDefinitionError, Status,
                                              UnknownCauseError, decide)
from parity.diagnose.probes._registry import PROBES, ProbeSpec, register, unregister
from parity.model.spec import GemmaSpec
from parity.model.taps import tap_order

# The topic modules register their probes on import. Name order makes the registry the same on every
# machine; it breaks ties only between probes of different modules at one tap (none today).
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["PROBES", "STATUSES", "Candidate", "Probe", "ProbeDefinitionError", "ProbeSpec", "Status",
           "UnknownCauseError", "decide", "register", "run_probes", "unregister"]


class _WholeTaps(Mapping):
    """A trace's taps with the reduced ones left out: a probe needs every element or says "cannot tell"."""

    def __init__(self, taps: Mapping) -> None:
        self._taps = taps

    def __getitem__(self, name: str):
        v = self._taps[name]
        if isinstance(v, ReducedTap):
            raise KeyError(name)
        return v

    def __iter__(self):
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)


def _calls(spec: GemmaSpec, layers: list[int]) -> list[tuple[ProbeSpec, int | None]]:
    """(probe, layer) for every registered probe, in the forward order of the taps they report on; probes at
    one tap keep their registration order, and a tap the model does not have comes last."""
    position = {t: i for i, t in enumerate(tap_order(spec))}
    calls = [(p, i) for p in PROBES.values() for i in (layers if p.per_layer else [None])]
    rank = {id(p): n for n, p in enumerate(PROBES.values())}
    return sorted(calls, key=lambda c: (position.get(c[0].tap_at(c[1]), len(position)), rank[id(c[0])]))


def run_probes(trace: Trace, spec: GemmaSpec, weights: dict, layers: list[int] | None = None,
               activations: str | None = None) -> list[Probe]:
    """Every registered probe on `trace` (every layer's, or those of `layers`). `activations`: how the run's
    matmuls round their inputs (a quantized run, parity.numerics.act_quant), which a probe that multiplies a
    captured tap by a weight does too (`matmul_input`)."""
    token = MATMUL_INPUT.set(activations)
    try:
        return _run_probes(trace, spec, weights, layers)
    finally:
        MATMUL_INPUT.reset(token)


def _run_probes(trace: Trace, spec: GemmaSpec, weights: dict, layers: list[int] | None) -> list[Probe]:
    layers = list(range(spec.num_layers)) if layers is None else layers
    trace = dataclasses.replace(trace, taps=_WholeTaps(trace.taps))
    out: list[Probe] = []
    for p, layer in _calls(spec, layers):
        tap = p.tap_at(layer)
        args = (trace, spec, weights) if layer is None else (trace, spec, weights, layer)
        try:
            got = p.fn(*args)
        except (ValueError, IndexError) as e:  # taps of the wrong shape (reported by the comparison as such)
            got = Probe.cannot_tell(p.name, tap, f"the taps do not fit ({e})")
        except Exception as e:  # noqa: BLE001 -- a probe that breaks is reported with its error, never dropped
            got = Probe.cannot_tell(p.name, tap, f"the probe failed: {type(e).__name__}: {e}"[:300])
        for r in got if isinstance(got, list) else [got]:
            if r.cause is not None and r.cause not in p.causes:
                raise ProbeDefinitionError(f"probe {p.name!r} named cause {r.cause!r} at {r.tap}, which it does "
                                           f"not declare (it declares {', '.join(p.causes)}); add it to its "
                                           "ProbeSpec's causes")
            out.append(r)
    return out
