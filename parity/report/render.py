"""Render a Report: report.json (the contract in DESIGN.md), report.md, and the terminal table."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass

from parity.model.effective import PROPERTIES, Difference, Unread, differences, normalized, parse
from parity.model.taps import layer_of
from parity.gate.verdict import decide, step_errors, used
from parity.numerics.display import number, share_text
from parity.numerics.metric_registry import METRICS
from parity.report.summary import cause_text, header, run_rows

tol_used = used  # the old name: how much of its bound a tap used


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


def _at(f) -> dict:
    return {"impl": f.impl, "dtype": f.dtype, "mode": f.mode, "tap": f.tap, "layer": f.layer, "prompt": f.prompt,
            "step": f.step}


def to_json(report) -> dict:
    v = decide(report)
    firsts = [r.first for r in v.runs if r.first is not None]
    lead = None
    if firsts:
        lead = _at(firsts[0])
    elif report.divergent_causes:  # a probe-only divergence (below the tolerance, named by a probe)
        d = report.divergent_causes[0]
        lead = {"impl": d.impl, "dtype": d.dtype, "mode": d.mode, "tap": d.tap, "layer": layer_of(d.tap),
                "prompt": None, "step": d.step}
    return _clean({
        "passed": v.passed,
        "status": v.status,
        "headline": v.headline,
        "verdicts": [{"impl": r.impl, "dtype": r.dtype, "mode": r.mode, "status": r.status, "taps": r.taps,
                      "passed_taps": r.passed_taps, "honest_taps": r.honest_taps, "basis": r.basis,
                      "first_divergence": _at(r.first) if r.first else None,
                      "explained_by": r.explanation.cause if r.first and r.explanation else None,
                      "worst": {**_at(r.worst), "used": used(r.worst)} if r.worst else None,
                      "not_compared": dict(r.not_compared)} for r in v.runs],
        "noise": None if report.noise is None else {"members": list(report.noise.members),
                                                    "margin": _margin(), "per_family": report.noise.summary()},
        "reference": report.reference,
        "decode": None if not report.continuation else {
            "continuation": list(report.continuation),
            "per_step": [{"impl": i, "dtype": d, "mode": m, "used": u} for (i, d, m), u in step_errors(report).items()]},
        "runs": [r.to_json() for r in report.runs],
        "taps": [r.to_json() for r in report.results],
        "metrics": {name: {"unit": m.unit, "format": m.fmt, "worse": m.worse, "description": m.description}
                    for name, m in METRICS.items()},
        "first_divergence": lead,
        "first_divergences": [_at(f) for f in firsts],
        "diagnosis": [d.to_json() for d in report.diagnosis],
        "probes": [p.to_json() for p in report.probes],
        "routing": [r.to_json() for r in getattr(report, "routing", ()) or ()],
        "quant": [q.to_json() for q in v.quant],
        "held": {label: {"weight_type": h.weight_type, "activations": h.activations, "weights_hash": h.weights_hash}
                 for label, h in (getattr(report, "held", None) or {}).items()},
        "effective": {run: normalized(d) for run, d in (report.effective or {}).items()},
        "spec": report.spec.to_dict(),
        "weights": {"hash": report.weights_hash, "source": report.weights_source},
        "prompts": report.prompts,
        "skipped": report.skipped,
        "tolerances": {k: {"atol_rms": v.atol, "rtol": v.rtol, "reason": v.reason}
                       for k, v in report.tolerances.items()},
    })


def _library_versions() -> str:
    """The numeric libraries' versions, read from the installed metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "transformers", "keras", "keras-hub", "jax", "numpy"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def _margin() -> float:
    from parity.numerics.tolerances import NOISE_MARGIN

    return NOISE_MARGIN


def headline(report) -> str:
    return decide(report).headline


def to_markdown(report) -> str:
    s = report.spec
    v = decide(report)
    mark = {"PASS": "✅ PASS", "WAIVED": "🟡 WAIVED", "FAIL": "❌ FAIL"}[v.status]
    lines = [f"## parity: {mark}", "", f"**{v.headline}**", ""]
    firsts = [r.first for r in v.runs if r.first is not None]
    if firsts:
        f = firsts[0]
        at = f", decode step {f.step}" if f.step is not None else ""
        lines += [f"First divergence: `{f.tap}` in {f.impl}@{f.dtype} ({f.mode}{at}, prompt {f.prompt}): "
                  f"{share_text(used(f))} of its bound (needs {number(f.stat)} x row RMS, {number(f.bound)} allowed: "
                  f"{f.basis}); max abs {number(f.max_abs)}"
                  + (f"; {len(firsts) - 1} more run(s) diverge" if len(firsts) > 1 else ""), ""]
    causes = [d for d in report.diagnosis]
    if causes:
        lines += ["| impl | dtype | cause | tap | evidence |", "|---|---|---|---|---|"]
        for d in causes:
            mode = f" ({d.mode})" if d.mode != "cumulative" else ""
            cause = cause_text(f"`{d.cause}`", d.severity)
            lines.append(f"| {d.impl} | {d.dtype}{mode} | {cause} | `{d.tap}` | {d.evidence} |")
        lines.append("")
    lines += [f"Spec `{s.name}` (Gemma {s.family}), {s.num_layers} layers, weights `{report.weights_hash}` "
              f"({report.weights_source}); reference `{report.reference}`; prompts "
              + ", ".join(f"{k} ({len(v)} tokens)" for k, v in report.prompts.items()), ""]
    if v.routing_lines:
        lines += ["MoE routing (tokens whose chosen experts differ from the reference's):", ""]
        lines += [f"- {line}" for line in v.routing_lines] + [""]
    if v.quant_lines:
        lines += ["Quantized runs (judged against the reference on the weights they hold; the loss apart):", ""]
        lines += [f"- {line}" for line in v.quant_lines] + [""]
    rows = run_rows(report, v)
    lines += ["| " + " | ".join(header()) + " |", "|---" * len(header()) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |" for row in rows]
    partial = [row for row in rows if row.not_compared]
    if partial:
        lines += [""] + [f"- {row.run} {row.mode}: {row.not_compared}" for row in partial]
    steps = step_table(report)
    if steps is not None:
        head, rows = steps
        lines += ["", "<details><summary>Decode: each step's worst tap, as a share of its bound (>1x diverges)"
                  "</summary>", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        lines += ["| " + " | ".join(f"**{c[:-1]}**" if c.endswith("!") else c for c in row) + " |" for row in rows]
        lines += ["", "</details>"]
    lines += ["", "<details><summary>Per-layer error (share of the bound used, worst tap of the layer)</summary>", ""]
    lines += _layer_table(report)
    lines += ["", "</details>", ""]
    if report.skipped:
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in report.skipped.items()), ""]
    lines += _effective_markdown(report)
    versions = {r.impl: r.version for r in report.runs}
    lines += ["Versions: " + "; ".join(f"{k} {v}" for k, v in versions.items()) + f"; {_library_versions()}", ""]
    return "\n".join(lines)


def _effective_markdown(report) -> list[str]:
    t = effective_table(report)
    if not t.cols:
        return []
    n = len({k for k, _ in t.differs})
    lines = [f"<details><summary>Effective configuration (what each built model computes; "
             f"{n or 'no'} propert{'y' if n == 1 else 'ies'} differ{'s' if n == 1 else ''} from {report.reference}"
             f"{': **bold**' if n else ''})</summary>", "",
             "| property | " + " | ".join(t.cols) + " |", "|---|" + "---|" * len(t.cols)]
    for k, cells in t.rows:
        row = [(f"**{x}**" if (k, c) in t.differs else f"_{x}_" if (k, c) in t.unread else x).replace("|", "\\|")
               for c, x in zip(t.cols, cells)]
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    for c in t.cols:
        if t.library[c]:
            lines += ["", f"{c}: " + "; ".join(f"{k} {v}" for k, v in t.library[c].items()).replace("|", "\\|")]
    return lines + ["", "</details>", ""]


def _layer_table(report) -> list[str]:
    runs = [r.key for r in report.runs]
    cell: dict = defaultdict(float)
    rows: list = []
    for r in report.results:
        key = r.layer if r.layer is not None else r.tap
        if key not in rows:
            rows.append(key)
        cell[(key, (r.impl, r.dtype, r.mode))] = max(cell[(key, (r.impl, r.dtype, r.mode))], used(r))
    head = "| layer | " + " | ".join(f"{i}@{d} {m[:3]}" for i, d, m in runs) + " |"
    out = [head, "|---|" + "---|" * len(runs)]
    for key in rows:
        vals = []
        for run in runs:
            v = cell[(key, run)]
            vals.append(("**" if v > 1 else "") + share_text(v) + ("**" if v > 1 else ""))
        out.append(f"| {key} | " + " | ".join(vals) + " |")
    return out


MAX_STEP_ROWS = 40  # more decode steps than this: every k-th step, the last, and every failing one


def step_table(report) -> tuple[list[str], list[list[str]]] | None:
    """The per-step error table (header, rows: step, position, one cell per decode run), or None."""
    errs = step_errors(report)
    if not errs:
        return None
    runs = list(errs)
    n = max(len(u) for u in errs.values())
    stride = max(1, -(-n // MAX_STEP_ROWS))
    failing = {s for u in errs.values() for s, x in enumerate(u) if x > 1}
    shown = sorted({s for s in range(0, n, stride)} | {n - 1} | failing)
    prefill = {len(v) for v in report.prompts.values()}
    pos = (lambda s: str(next(iter(prefill)) + s)) if len(prefill) == 1 else (lambda s: "+" + str(s))
    head = ["step", "position"] + [f"{i}@{d} {m}" for i, d, m in runs]
    rows = [[str(s), pos(s)] + [share_text(errs[r][s]) + ("!" if errs[r][s] > 1 else "") if s < len(errs[r]) else "-"
                                for r in runs] for s in shown]
    return head, rows


def _effective_terminal(report, console, verbose: bool) -> None:
    """The properties that differ from the reference (every property and the library facts with verbose)."""
    from rich.markup import escape
    from rich.table import Table

    t = effective_table(report)
    if len(t.cols) < 2 and not verbose:
        return
    rows = t.rows if verbose else t.differing_rows()
    if not rows:
        console.print(f"effective configuration: every implementation computes {report.reference}'s "
                      f"{len(t.rows)} properties (--verbose lists them)")
        return
    title = ("what each built model computes (yellow: differs from the reference)" if verbose else
             f"effective configuration: {len(rows)} propert{'y differs' if len(rows) == 1 else 'ies differ'} from "
             "the reference (--verbose lists all)")
    conf = Table(title=title, show_lines=False, title_justify="left")
    conf.add_column("property", overflow="fold")
    for c in t.cols:
        conf.add_column(c, overflow="fold")
    for k, cells in rows:
        conf.add_row(k, *[f"[yellow]{escape(x)}[/yellow]" if (k, c) in t.differs else escape(x)
                          for c, x in zip(t.cols, cells)])
    console.print(conf)
    if verbose:
        for c in t.cols:
            if t.library[c]:
                console.print(f"  [bold]{escape(c)}[/bold]: " + "; ".join(f"{escape(k)} {escape(v)}"
                                                                       for k, v in t.library[c].items()),
                              soft_wrap=True)


def print_terminal(report, console=None, verbose: bool = False) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    import sys

    console = console or Console(width=None if sys.stdout.isatty() else 150)
    s = report.spec
    v = decide(report)
    color = {"PASS": "green", "WAIVED": "yellow", "FAIL": "red"}[v.status]
    console.print(f"[bold {color}]{v.headline}[/bold {color}]")  # the verdict and its cause lead
    console.print(f"[bold]parity[/bold] {s.name} (Gemma {s.family}, {s.num_layers} layers), weights "
                  f"{report.weights_hash} ({report.weights_source}), reference {report.reference}")
    _effective_terminal(report, console, verbose)
    table = Table(show_lines=False)
    # a metric's unit under its name, and its numbers never folded; the run's label is never cut
    units = {m.header: f"{m.name}\n{m.unit}" for m in METRICS.values() if m.unit}
    for col in header():
        table.add_column(units.get(col, col), no_wrap=col in units or col == "run")
    rows = run_rows(report, v)
    for row in rows:
        style = {"PASS": "green", "WAIVED": "yellow", "FAIL": "red"}[row.status]
        # cells are text, not markup: "[prompt]" in the worst tap's cell is shown, not taken for a style
        table.add_row(*map(escape, row.cells()[:-1]), f"[{style}]{row.status}[/{style}]")
    console.print(table)
    steps = step_table(report)
    if steps is not None:
        head, step_rows = steps  # not `rows`: the run rows are read again below
        st = Table(title="decode: each step's worst tap, as a share of its bound (>1x diverges)",
                   title_justify="left", show_lines=False)
        for col in head:
            st.add_column(col)
        for row in step_rows:
            st.add_row(*[f"[red]{c}[/red]" if c.endswith("!") else c for c in row])
        console.print(st)
    for row in rows:
        if row.not_compared:
            console.print(f"  [yellow]{row.run} {row.mode}[/yellow]: {row.not_compared}", soft_wrap=True)
    for line in v.routing_lines:  # MoE layers whose chosen experts differ from the reference's
        console.print(f"  [bold]routing[/bold] {escape(line)}", soft_wrap=True)
    for q in v.quant:  # quantized runs' loss against the unquantized reference, apart from the verdict
        console.print(f"  [bold]{'quantization' if q.within else '[red]quantization[/red]'}[/bold] {escape(q.text())}",
                      soft_wrap=True)
    for d in report.diagnosis:
        console.print(f"  [bold]{escape(d.cause)}[/bold] {escape(d.impl)}@{d.dtype} at {d.tap}: {escape(d.evidence)}",
                      soft_wrap=True)
    for k, why in report.skipped.items():
        console.print(f"  [yellow]skipped {k}[/yellow]: {why}")
    console.print(f"[bold {color}]{v.headline}[/bold {color}]")


def value_text(v) -> str:
    """One effective-configuration value as every view writes it."""
    if isinstance(v, (list, tuple)) and v and all(x == v[0] for x in v):
        return f"{value_text(v[0])} (all layers)"
    if isinstance(v, float):
        return f"{v:.6g}"
    if v is None:
        return "none"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(_clean(v), default=str)
    return str(v)


def property_text(p, v) -> str:
    """A property's value as the table writes it: its own rendering, per layer compressed."""
    if isinstance(v, Unread):
        return v.reason
    if p.render is not None and not isinstance(v, (list, tuple)):
        return p.render(v)
    return value_text(v)


@dataclass(frozen=True)
class EffectiveTable:
    """The effective configuration as property x implementation, for every view."""
    cols: list[str]  # impl@dtype, the reference first
    rows: list[tuple[str, list[str]]]  # (property, cell text per column), every property of PROPERTIES
    differs: set[tuple[str, str]]  # (property, column): differs from the reference's value
    unread: set[tuple[str, str]]  # (property, column): not read (not a setting of the library, not reported)
    library: dict[str, dict[str, str]]  # column -> library fact -> text
    found: list[Difference]  # the typed differences (parity.model.effective.differences)

    def differing_rows(self) -> list[tuple[str, list[str]]]:
        names = {k for k, _ in self.differs}
        return [(k, cells) for k, cells in self.rows if k in names]


def effective_table(report) -> EffectiveTable:
    """The effective configuration table: every property for every implementation, a cell marked where its
    value differs from the reference's (compared by value: parity.model.effective.differences)."""
    eff = report.effective or {}
    cols = sorted(eff, key=lambda c: c != report.reference)  # the reference first, then run order
    parsed = {c: parse(eff[c]) for c in cols}
    found = differences(eff, report.reference)
    rows, unread = [], set()
    for p in PROPERTIES:
        cells = []
        for c in cols:
            v = parsed[c][0][p.name]
            cells.append(property_text(p, v))
            if isinstance(v, Unread):
                unread.add((p.name, c))
        rows.append((p.name, cells))
    library = {c: {k: value_text(v) for k, v in parsed[c][1].items()} for c in cols}
    return EffectiveTable(cols, rows, {(d.property, d.run) for d in found}, unread, library, found)
