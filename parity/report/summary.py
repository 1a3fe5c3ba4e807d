"""The run table, written once: the rows every view maps (pytest-benchmark's one `TableResults`).

`run_rows` turns the verdict (parity.gate.verdict.decide) into one `RunRow` per run, with every cell already
worded; the terminal, report.md, report.html and the pytest summary only lay the rows out (and colour them).
The columns are the fixed ones around one column per registered metric
(parity.numerics.metric_registry): a metric registered there shows in all four views with no renderer
touched. Numbers are written by parity.numerics.display's `number` and `share_text`, the only formatters.
"""

from __future__ import annotations

from dataclasses import dataclass

from parity.compare.pairs import used
from parity.gate.verdict import RunVerdict, Verdict, decide
from parity.numerics.display import number, share_text
from parity.numerics.metric_registry import METRICS

# the fixed columns; the metrics' columns go after "worst tap" (`header`)
COLUMNS = ("run", "mode", "taps ok", "worst tap", "first divergence", "cause", "verdict")
_METRICS_AT = COLUMNS.index("worst tap") + 1
SEVERITY_TAG = {"note": " (note)", "waived": " (waived)"}  # a divergence is untagged


@dataclass(frozen=True)
class RunRow:
    run: str  # impl@dtype
    version: str  # the implementation's version, as the run reported it
    mode: str
    taps_ok: str  # "passed/compared"
    worst: str  # the tap that used most of its bound: "tap [prompt] max_abs (share of bound)", or "-"
    first: str  # the first divergence's tap, or "-"
    causes: tuple[tuple[str, str], ...]  # (cause, severity) of this run's diagnosis entries
    status: str  # PASS, FAIL or WAIVED
    metrics: tuple[str, ...]  # each registered metric's worst value over the run's taps, in `header` order
    not_compared: str  # "N tap(s) not compared: ...", or ""

    @property
    def cause(self) -> str:
        return ", ".join(cause_text(c, s) for c, s in self.causes) or "-"

    def cells(self) -> tuple[str, ...]:
        """The row as text, one cell per `header()` column."""
        fixed = (self.run, self.mode, self.taps_ok, self.worst, self.first, self.cause, self.status)
        return fixed[:_METRICS_AT] + self.metrics + fixed[_METRICS_AT:]


def header() -> tuple[str, ...]:
    """The table's columns: the fixed ones with each registered metric's after "worst tap"."""
    return COLUMNS[:_METRICS_AT] + tuple(m.header for m in METRICS.values()) + COLUMNS[_METRICS_AT:]


def run_rows(report, verdict: Verdict | None = None) -> list[RunRow]:
    """One row per run of `report`, in its order (`verdict`: decide(report), if already at hand)."""
    v = verdict if verdict is not None else decide(report)
    return [_row(report, run, rv) for run, rv in zip(report.runs, v.runs)]


def _row(report, run, rv: RunVerdict) -> RunRow:
    rs = report.run_results(rv.impl, rv.dtype, rv.mode)
    return RunRow(
        run=rv.label, version=run.version, mode=rv.mode, taps_ok=f"{rv.passed_taps}/{rv.taps}",
        worst=worst_text(rv.worst), first=rv.first.tap if rv.first else "-",
        causes=tuple((c.cause, c.severity) for c in rv.causes), status=rv.status,
        metrics=tuple(m.text(m.worst(r.metrics.get(name) for r in rs)) for name, m in METRICS.items()),
        not_compared=rv.not_compared_text,
    )


def worst_text(r) -> str:
    """A tap result as the worst-tap cell: `tap [prompt] max_abs (share of bound)`."""
    if r is None:
        return "-"
    return f"{r.tap} [{r.prompt}] {number(r.max_abs)} ({share_text(used(r))} of bound)"


def cause_text(cause: str, severity: str) -> str:
    """`geglu-swapped`, `geglu-swapped (waived)`, `attn-softcap-missing (note)`."""
    return cause + SEVERITY_TAG.get(severity, "")
