"""Diagnose: name the cause of each divergence with an id from DIVERGENCES.md, with evidence.

Probes give direct evidence on each implementation's own inputs. A probe
finding fails the run even when the tolerance passed (in bf16 an exact GELU
hides under rounding noise), except for causes that are precision choices
rather than wrong formulas (`PRECISION_ONLY`), which are reported as notes
unless the tolerance also failed. When no probe explains a failing tap, the
diagnosis says so ("unexplained") rather than guess.
"""

from __future__ import annotations

from parity.probes import run_probes
from parity.taps import tap_order

# a different rounding order, not a different function: named, reported, not failed on its own
PRECISION_ONLY = {"act-lowp", "softmax-precision"}


def _order(spec) -> dict[str, int]:
    return {t: i for i, t in enumerate(tap_order(spec))}


def diagnose(report) -> None:
    """Fill report.probes and report.diagnosis (in place)."""
    spec = report.spec
    weights = report.weights.tensors if report.weights is not None else {}
    order = _order(spec)
    prompt = "long" if "long" in report.prompts else next(iter(report.prompts))
    for run in report.runs:
        impl, dtype, mode = run["impl"], run["dtype"], run["mode"]
        if mode != "cumulative":
            continue  # probes read an implementation's own chain of taps
        trace = report.trace(impl, dtype, prompt, mode)
        probes = run_probes(trace, spec, weights)
        for p in probes:
            report.probes.append({"impl": impl, "dtype": dtype, **p.to_json()})
        results = report.run_results(impl, dtype, mode)
        failed = [r for r in results if not r.passed]
        first = min(failed, key=lambda r: order.get(r.tap, 10**6)) if failed else None
        # a probe that matched none of its candidates is evidence, not a cause: counterfactuals may still name it
        found = sorted((p for p in probes if p.cause and p.cause != "unexplained"), key=lambda p: order.get(p.tap, 10**6))
        seen = set()
        for p in found:
            if p.cause in seen:
                continue
            seen.add(p.cause)
            precision = p.cause in PRECISION_ONLY and first is None
            report.diagnosis.append({
                "impl": impl, "dtype": dtype, "cause": p.cause, "tap": p.tap,
                "evidence": f"{p.name} probe: {p.sentence()}",
                "severity": "note" if precision else "divergence", "source": "probe",
            })
        if first is not None and not any(p.cause not in PRECISION_ONLY for p in found) and report.weights is None:
            report.diagnosis.append({
                "impl": impl, "dtype": dtype, "tap": first.tap, "severity": "divergence", "cause": "unexplained",
                "source": "first-divergence",
                "evidence": f"first divergence at {first.tap}; no probe names it, and counterfactuals need the "
                            "weights (pass --weights)"})
        elif first is not None and not any(p.cause not in PRECISION_ONLY for p in found):
            report.diagnosis.append(_counterfactual(report, trace_for(report, impl, dtype, first.prompt), first, order))


def trace_for(report, impl, dtype, prompt):
    return report.trace(impl, dtype, prompt, "cumulative")


def _counterfactual(report, trace, first, order) -> dict:
    from parity.counterfactuals import explain

    where = f"first divergence at {first.tap} (max abs {first.max_abs:.3g}, allowed {first.atol:.3g})"
    best = explain(trace, report.spec, report.weights, report.tolerances, first.tap, order)
    entry = {"impl": first.impl, "dtype": first.dtype, "tap": first.tap, "severity": "divergence"}
    if best and best["explains"]:
        runner = (f"; next best {best['runner_up']!r} uses {best['runner_up_score']:.3g}x"
                  if best["runner_up"] else "")
        return {**entry, "cause": best["cause"], "source": "counterfactual",
                "evidence": f"{where}; the reference re-run with {best['label']!r} reproduces it, using "
                            f"{best['score']:.3g}x of the tolerance through layer end{runner}"}
    closest = f"; closest single change {best['label']!r} still uses {best['score']:.3g}x of the tolerance" \
        if best and best["label"] else ""
    if best and best.get("baseline_score") is not None and best["baseline_score"] <= 1.0:
        closest = (f"; the correct port run in {first.dtype} reproduces it (uses {best['baseline_score']:.3g}x "
                   "of the tolerance): honest rounding beyond this dtype's tolerance at this tap, not a wrong formula")
    return {**entry, "cause": "unexplained", "source": "first-divergence",
            "evidence": f"{where}; no probe and no single-change counterfactual explains it{closest}"}
