"""Diagnose: name the cause of each divergence with an id from DIVERGENCES.md, with evidence.

Probes give direct evidence on each implementation's own inputs. A probe
finding fails the run even when the tolerance passed (in bf16 an exact GELU
hides under rounding noise), except for causes that are precision choices
rather than wrong formulas (`PRECISION_ONLY`), which are reported as notes
unless the tolerance also failed. When no probe explains a failing tap, the
diagnosis says so ("unexplained") rather than guess.
"""

from __future__ import annotations

from parity.diagnose.causes import NOTE_CAUSES
from parity.compare.pairs import DECODE_MODES, used
from parity.diagnose.probes import run_probes
from parity.model.taps import tap_order
from parity.numerics.display import share_text
from parity.diagnose.counterfactuals import PREFILL, explain
from parity.diagnose.finding import Finding, RunProbe
from parity.diagnose.search import named
from parity.diagnose.logit_shift import shift_notes
from parity.diagnose.config import config_findings
from parity.diagnose.overflow import overflow

# a different rounding order, not a different function: named, reported, never failed on its own
PRECISION_ONLY = NOTE_CAUSES


def _order(spec) -> dict[str, int]:
    return {t: i for i, t in enumerate(tap_order(spec))}


def diagnose(report) -> None:
    """Fill report.probes and report.diagnosis (in place).

    Every failing cumulative run's first divergence gets exactly one entry
    marked `"explains": <its tap>`: the probe cause at or before that tap
    (upstream faults propagate), else a counterfactual that brings the error
    back into honest noise, else `unexplained` with the closest candidates. A
    cause found at a later tap never stands in for it. Precision causes stay
    notes unless they are what explains the first divergence.
    """
    for run in report.runs:
        if run.mode != "cumulative":
            continue  # probes read an implementation's own chain of taps
        probes, entries = diagnose_run(report, run.impl, run.dtype)
        report.probes += probes
        report.diagnosis += entries
    report.diagnosis += config_findings(report)  # after the runs' entries: it may take over an unexplained one
    if any(run.mode in DECODE_MODES for run in report.runs):
        from parity.diagnose.decode import diagnose_decode

        report.diagnosis += diagnose_decode(report)
    report.diagnosis += shift_notes(report)  # after the probes: theirs, where they ran, says more


def diagnose_run(report, impl: str, dtype: str) -> tuple[list[RunProbe], list[Finding]]:
    """One cumulative run's probe results and diagnosis entries; the entry that explains the first
    divergence comes first, so a reader of `diagnosis[0]` of a run meets the cause of its first divergence."""
    spec = report.spec
    held = _weights_for(report, impl, dtype)  # a quantized run's own (dequantized) weights
    weights = held.tensors if held is not None else {}
    order = _order(spec)
    prompt = "long" if "long" in report.prompts else next(iter(report.prompts))
    trace = report.trace(impl, dtype, prompt, "cumulative")
    h = getattr(report, "held", {}).get(f"{impl}@{dtype}")
    probes = run_probes(trace, spec, weights, activations=h.activations if h is not None else None)
    probe_rows = [RunProbe(impl, dtype, p) for p in probes]
    entries: list[Finding] = []
    results = report.run_results(impl, dtype, "cumulative")
    failed = [r for r in results if not r.passed]
    first = min(failed, key=lambda r: order.get(r.tap, 10**6)) if failed else None
    at_first = order.get(first.tap, 10**6) if first is not None else None
    # a probe that matched none of its candidates is evidence, not a cause: counterfactuals may still name it
    found = sorted((p for p in probes if p.cause and p.cause != "unexplained"), key=lambda p: order.get(p.tap, 10**6))
    # float16 overflow: a probe at or after the first non-finite tap reads infinities and explains nothing
    ovf = overflow(report, impl, dtype, first) if first is not None and not first.sampled else None
    tainted = _nonfinite_from(trace, order) if ovf is not None else None
    downstream = [p for p in found if tainted is not None and order.get(p.tap, 10**6) >= tainted]
    found = [p for p in found if p not in downstream]
    seen, explained = set(), False
    for p in found:
        if p.cause in seen:
            continue
        seen.add(p.cause)
        upstream = at_first is not None and order.get(p.tap, 10**6) <= at_first
        note = p.cause in PRECISION_ONLY and not (first is not None and p.tap == first.tap)
        explains = upstream and not note and not explained
        explained = explained or explains
        entries.append(Finding(impl=impl, dtype=dtype, cause=p.cause, tap=p.tap,
                               evidence=f"{p.name} probe: {p.sentence()}",
                               severity="note" if note else "divergence", source="probe",
                               explains=first.tap if explains else None))
    if first is not None and not explained:
        entries.append(_explain_first(report, impl, dtype, first, order, downstream))
    entries.sort(key=lambda e: e.explains is None)  # stable: the rest keep their forward order
    return probe_rows, entries


def _nonfinite_from(trace, order) -> int | None:
    """The forward-order index of the first tap of `trace` holding inf or NaN (None: every kept tap finite)."""
    import numpy as np

    bad = [order.get(t, 10**6) for t, a in trace.taps.items()
           if isinstance(a, np.ndarray) and a.dtype.kind == "f" and not np.isfinite(a).all()]
    return min(bad) if bad else None


def _explain_first(report, impl: str, dtype: str, first, order, downstream=()) -> Finding:
    """The entry for a first divergence no probe at or before it explains; `downstream`: the probes that
    matched a cause on inputs float16 overflow had already made non-finite (named in the overflow's evidence,
    never a finding of their own)."""
    def entry(evidence: str) -> Finding:
        return Finding(impl=impl, dtype=dtype, tap=first.tap, severity="divergence", cause="unexplained",
                       source="first-divergence", explains=first.tap, evidence=evidence)

    got = overflow(report, impl, dtype, first)
    if got is not None and downstream:
        got += ("; not reported as causes, their inputs already non-finite: "
                + ", ".join(f"the {p.name} probe's {p.cause} at {p.tap}" for p in downstream))
    if got is not None:  # float16's range, not a formula: checked before anything is re-run
        return Finding(impl=impl, dtype=dtype, tap=first.tap, severity="divergence", cause="fp16-overflow",
                       source="probe", explains=first.tap, evidence=got)
    if first.failure in ("shape", "nonfinite") and not first.sampled:
        # a shape mismatch, a NaN, an overflow: no formula change explains that (a mask change, finite
        # scores where the reference has -inf, is left to the counterfactuals)
        return entry(f"first divergence at {first.tap}: {first.reason}")
    if _weights_for(report, impl, dtype) is None:
        return entry(f"first divergence at {first.tap}; no probe names it, and counterfactuals need the weights "
                     "(pass --weights)")
    return _counterfactual(report, trace_for(report, impl, dtype, first.prompt), first, order)


def _weights_for(report, impl, dtype):
    """The weights a run computes with (a quantized run's held ones; parity.harness.Report.weights_for)."""
    fn = getattr(report, "weights_for", None)
    return fn(impl, dtype) if fn else report.weights


def _noise_for(report, impl, dtype):
    fn = getattr(report, "noise_for", None)
    return fn(impl, dtype) if fn else report.noise


def trace_for(report, impl, dtype, prompt):
    return report.trace(impl, dtype, prompt, "cumulative")


def _counterfactual(report, trace, first, order) -> Finding:
    where = (f"first divergence at {first.tap} ({share_text(used(first))} of its bound: needs "
             f"{first.stat:.3g} x row RMS, allowed {first.bound:.3g}, {first.basis})")
    ranking = explain(trace, report.spec, _weights_for(report, first.impl, first.dtype), report.tolerances,
                      first.tap, order, _noise_for(report, first.impl, first.dtype))
    return Finding(impl=first.impl, dtype=first.dtype, tap=first.tap, severity="divergence", explains=first.tap,
                   **named(ranking, where, first.dtype, PREFILL))
