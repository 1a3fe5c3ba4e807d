"""Render a Report: report.json (the contract in DESIGN.md), report.md, and the terminal table."""

from __future__ import annotations

import json
import math
from collections import defaultdict

from parity.taps import layer_of


def tol_used(r) -> float:
    """How much of its tolerance a tap used: the atol that would pass over the atol allowed."""
    if not math.isfinite(r.max_abs):
        return math.inf
    if r.atol <= 0:
        return 0.0 if r.max_abs == 0 else math.inf
    return r.needed_atol / r.atol


def _num(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _clean(o):
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return _num(o)


def causes_for(report, impl: str, dtype: str) -> list[dict]:
    return [d for d in report.diagnosis if d["impl"] == impl and d["dtype"] == dtype]


def to_json(report) -> dict:
    firsts = report.first_divergences()
    lead = None
    if firsts:
        f = firsts[0]
        lead = {"impl": f.impl, "dtype": f.dtype, "mode": f.mode, "tap": f.tap, "layer": f.layer, "prompt": f.prompt}
    elif report.divergent_causes:  # a probe-only divergence (below the tolerance, named by a probe)
        d = report.divergent_causes[0]
        lead = {"impl": d["impl"], "dtype": d["dtype"], "mode": "cumulative", "tap": d["tap"],
                "layer": layer_of(d["tap"]), "prompt": None}
    return _clean({
        "passed": report.passed,
        "reference": report.reference,
        "runs": report.runs,
        "taps": [r.to_json() for r in report.results],
        "first_divergence": lead,
        "first_divergences": [
            {"impl": f.impl, "dtype": f.dtype, "mode": f.mode, "tap": f.tap, "layer": f.layer, "prompt": f.prompt}
            for f in firsts
        ],
        "diagnosis": report.diagnosis,
        "probes": report.probes,
        "effective": report.effective,
        "spec": report.spec.to_dict(),
        "weights": {"hash": report.weights_hash, "source": report.weights_source},
        "prompts": report.prompts,
        "skipped": report.skipped,
        "tolerances": {k: {"atol_rms": v.atol, "rtol": v.rtol, "reason": v.reason}
                       for k, v in report.tolerances.items()},
    })


def run_summary(report, run: dict) -> dict:
    rs = report.run_results(run["impl"], run["dtype"], run["mode"])
    worst = max(rs, key=tol_used) if rs else None
    first = next((r for r in rs if not r.passed), None)
    causes = causes_for(report, run["impl"], run["dtype"]) if run["mode"] == "cumulative" else []
    div = [c for c in causes if c["severity"] == "divergence"]
    return {
        "label": f"{run['impl']}@{run['dtype']}", "mode": run["mode"],
        "passed_taps": sum(r.passed for r in rs), "taps": len(rs),
        "worst": worst, "first": first, "causes": causes,
        "verdict": "PASS" if first is None and not div else "FAIL",
    }


def _worst_text(r) -> str:
    if r is None:
        return "-"
    return f"{r.tap} [{r.prompt}] {r.max_abs:.2g} ({tol_used(r):.0%} of tol)"


def _cause_text(causes: list[dict]) -> str:
    if not causes:
        return "-"
    return ", ".join(c["cause"] + (" (note)" if c["severity"] == "note" else "") for c in causes)


def headline(report) -> str:
    if report.passed:
        notes = [d for d in report.diagnosis if d["severity"] == "note"]
        waived = [d for d in report.diagnosis if d["severity"] == "waived"]
        extra = f"; notes: {', '.join(sorted({d['cause'] for d in notes}))}" if notes else ""
        if waived:
            extra += f"; waived: {', '.join(sorted({d['impl'] + ' ' + d['cause'] for d in waived}))}"
        return f"PASS: {len(report.runs)} run(s) agree with {report.reference} within tolerance{extra}"
    causes = report.divergent_causes
    if causes:
        c = causes[0]
        return f"FAIL: {c['impl']}@{c['dtype']} diverges at {c['tap']}: cause {c['cause']}"
    f = report.first_divergences()[0]
    return f"FAIL: {f.impl}@{f.dtype} diverges at {f.tap}"


def to_markdown(report) -> str:
    s = report.spec
    lines = [f"## parity: {'✅ PASS' if report.passed else '❌ FAIL'}", "", f"**{headline(report)}**", ""]
    firsts = report.first_divergences()
    if firsts:
        f = firsts[0]
        lines += [f"First divergence: `{f.tap}` in {f.impl}@{f.dtype} ({f.mode}, prompt {f.prompt}): "
                  f"max abs {f.max_abs:.3g} where {f.atol:.3g} is allowed"
                  + (f"; {len(firsts) - 1} more run(s) diverge" if len(firsts) > 1 else ""), ""]
    causes = [d for d in report.diagnosis]
    if causes:
        lines += ["| impl | dtype | cause | tap | evidence |", "|---|---|---|---|---|"]
        for d in causes:
            sev = " (note)" if d["severity"] == "note" else ""
            lines.append(f"| {d['impl']} | {d['dtype']} | `{d['cause']}`{sev} | `{d['tap']}` | {d['evidence']} |")
        lines.append("")
    lines += [f"Spec `{s.name}` (Gemma {s.family}), {s.num_layers} layers, weights `{report.weights_hash}` "
              f"({report.weights_source}); reference `{report.reference}`; prompts "
              + ", ".join(f"{k} ({len(v)} tokens)" for k, v in report.prompts.items()), ""]
    lines += ["| run | mode | taps passed | worst tap | first divergence | cause | verdict |",
              "|---|---|---|---|---|---|---|"]
    for run in report.runs:
        sm = run_summary(report, run)
        first = f"`{sm['first'].tap}`" if sm["first"] else "-"
        lines.append(f"| {sm['label']} | {sm['mode']} | {sm['passed_taps']}/{sm['taps']} | {_worst_text(sm['worst'])} "
                     f"| {first} | {_cause_text(sm['causes'])} | {sm['verdict']} |")
    lines += ["", "<details><summary>Per-layer error (share of tolerance used, worst tap of the layer)</summary>", ""]
    lines += _layer_table(report)
    lines += ["", "</details>", ""]
    if report.skipped:
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in report.skipped.items()), ""]
    lines += ["<details><summary>Effective configuration</summary>", "", "```"]
    for impl, eff in report.effective.items():
        lines.append(f"{impl}: " + json.dumps(_clean(eff), default=str))
    lines += ["```", "", "</details>", ""]
    return "\n".join(lines)


def _layer_table(report) -> list[str]:
    runs = [(r["impl"], r["dtype"], r["mode"]) for r in report.runs]
    cell: dict = defaultdict(float)
    rows: list = []
    for r in report.results:
        key = r.layer if r.layer is not None else r.tap
        if key not in rows:
            rows.append(key)
        cell[(key, (r.impl, r.dtype, r.mode))] = max(cell[(key, (r.impl, r.dtype, r.mode))], tol_used(r))
    head = "| layer | " + " | ".join(f"{i}@{d} {m[:3]}" for i, d, m in runs) + " |"
    out = [head, "|---|" + "---|" * len(runs)]
    for key in rows:
        vals = []
        for run in runs:
            v = cell[(key, run)]
            vals.append(("**" if v > 1 else "") + f"{v:.0%}" + ("**" if v > 1 else ""))
        out.append(f"| {key} | " + " | ".join(vals) + " |")
    return out


def print_terminal(report, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    console = console or Console(width=None if sys.stdout.isatty() else 150)
    s = report.spec
    color = "green" if report.passed else "red"
    console.print(f"[bold {color}]{headline(report)}[/bold {color}]")  # the verdict and its cause lead
    console.print(f"[bold]parity[/bold] {s.name} (Gemma {s.family}, {s.num_layers} layers), weights "
                  f"{report.weights_hash} ({report.weights_source}), reference {report.reference}")
    for impl, eff in report.effective.items():
        console.print(f"  [dim]{impl} computes:[/dim] " + "; ".join(
            f"{k}={_short(v)}" for k, v in eff.items()), soft_wrap=True)
    table = Table(show_lines=False)
    for col in ("run", "mode", "taps ok", "worst tap", "first divergence", "cause", "verdict"):
        table.add_column(col)
    for run in report.runs:
        sm = run_summary(report, run)
        style = "green" if sm["verdict"] == "PASS" else "red"
        table.add_row(sm["label"], sm["mode"], f"{sm['passed_taps']}/{sm['taps']}", _worst_text(sm["worst"]),
                      sm["first"].tap if sm["first"] else "-", _cause_text(sm["causes"]),
                      f"[{style}]{sm['verdict']}[/{style}]")
    console.print(table)
    for d in report.diagnosis:
        console.print(f"  [bold]{d['cause']}[/bold] {d['impl']}@{d['dtype']} at {d['tap']}: {d['evidence']}",
                      soft_wrap=True)
    for k, v in report.skipped.items():
        console.print(f"  [yellow]skipped {k}[/yellow]: {v}")
    color = "green" if report.passed else "red"
    console.print(f"[bold {color}]{headline(report)}[/bold {color}]")


def _short(v) -> str:
    if isinstance(v, list) and v and all(x == v[0] for x in v):
        return f"{v[0]} (all layers)"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
