"""The one verdict: per run PASS, FAIL or WAIVED, the first divergence, the worst tap, the causes.

Every output (terminal, report.json, report.md, report.html, the pytest
summary, the exit status) renders what `decide` returns; none of them decides
anything on its own. Numbers shown to people are formatted here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from parity.compare.pairs import first_key, forward_order, share, used  # noqa: F401 -- the verdict's numbers
from parity.model.taps import family_of
from parity.numerics.display import share_text

PASS, FAIL, WAIVED = "PASS", "FAIL", "WAIVED"


@dataclass(frozen=True)
class RunVerdict:
    impl: str
    dtype: str
    mode: str
    status: str
    taps: int  # taps compared
    passed_taps: int  # within their bound (waived ones not counted)
    honest_taps: int  # beyond the fixed table but within honest noise: reported, never a failure
    first: object | None  # the first unwaived failing TapResult in forward order
    worst: object | None  # the TapResult that used the largest share of its bound
    causes: tuple  # this run's diagnosis entries (cumulative rows; probes read cumulative traces)
    basis: str  # "honest" (every tap had honest runs), "table" (none did) or "mixed"
    not_compared: tuple = ()  # (tap, reason) the implementation declared it cannot give

    @property
    def not_compared_text(self) -> str:
        """`N tap(s) not compared: family (reason); ...`, grouped by tap family and reason."""
        if not self.not_compared:
            return ""

        groups: dict = {}
        for tap, why in self.not_compared:
            groups.setdefault((family_of(tap), why), 0)
            groups[(family_of(tap), why)] += 1
        return f"{len(self.not_compared)} tap(s) not compared: " + "; ".join(
            f"{fam} ({why})" for (fam, why) in groups)

    @property
    def label(self) -> str:
        return f"{self.impl}@{self.dtype}"

    @property
    def explanation(self):
        """The diagnosis entry that explains the first divergence (or says it is unexplained)."""
        if self.first is None:
            return None
        return next((c for c in self.causes if c.explains == self.first.tap), None)


@dataclass(frozen=True)
class Verdict:
    status: str
    runs: tuple[RunVerdict, ...]
    headline: str
    # MoE layers whose chosen experts differ from the reference's (parity.compare.routing.RoutingResult): honest
    # near-ties are reported, never failed; a clear-margin flip fails its moe.experts tap
    routing: tuple = ()
    # quantized runs' loss against the unquantized reference (parity.compare.quant.QuantLoss): reported apart
    # from the divergences; one over its budget fails the gate (exit 1) as quantization loss, never as a cause
    quant: tuple = ()

    @property
    def quant_lines(self) -> list[str]:
        """One line per quantized run: its loss, against its budget."""
        return [q.text() for q in self.quant]

    @property
    def over_budget(self) -> tuple:
        return tuple(q for q in self.quant if not q.within)

    @property
    def routing_lines(self) -> list[str]:
        """One line per (run, prompt, MoE layer) with a flipped token."""
        return [r.text() for r in self.routing]

    @property
    def passed(self) -> bool:
        return self.status != FAIL

    @property
    def lead(self) -> RunVerdict | None:
        return next((r for r in self.runs if r.status == FAIL), None)


def _run_verdict(report, run: dict) -> RunVerdict:
    impl, dtype, mode = run.key
    rs = report.run_results(impl, dtype, mode)
    causes = tuple(d for d in report.diagnosis if d.run == run.key)
    failing = [r for r in rs if not r.passed and not r.waived]
    divergent = [c for c in causes if c.severity == "divergence"]
    waived = [r for r in rs if not r.passed and r.waived] or [c for c in causes if c.severity == "waived"]
    status = FAIL if failing or divergent else WAIVED if waived else PASS
    bases = {r.noise is not None for r in rs}
    missing: dict = {}
    for t in report.traces:
        if (t.impl, t.dtype, t.mode) == (impl, dtype, mode):
            missing.update(getattr(t, "unavailable", {}) or {})
    order = _order(report)
    # the first divergence in forward order over every prompt (ties: the earlier prompt), as diagnose finds it
    first = min(failing, key=lambda r: first_key(r, order)) if failing else None
    return RunVerdict(
        not_compared=tuple(sorted(missing.items(), key=lambda kv: order.get(kv[0], 10**6))),
        impl=impl, dtype=dtype, mode=mode, status=status, taps=len(rs),
        passed_taps=sum(r.passed for r in rs),
        honest_taps=sum(r.passed and r.stat > r.floor for r in rs),
        first=first, worst=max(rs, key=used) if rs else None, causes=causes,
        basis="honest" if bases == {True} else "table" if bases == {False} else "mixed",
    )


def check_compared(runs: list, results) -> None:
    """Comparing nothing is never a PASS: a run none of whose taps was compared (every tap declared
    unavailable, or nothing returned) is an implementation that failed to give a result (exit 3)."""
    from parity.errors import ImplementationError

    counted = {(r.impl, r.dtype, r.mode) for r in results}
    for run in runs:
        if run.key not in counted:
            raise ImplementationError(f"{run.impl}@{run.dtype}", f"compare ({run.mode})",
                                      "no tap was compared: it gave none of the canonical taps (every one declared "
                                      "unavailable or missing)", "an implementation must return at least the "
                                      "taps it computes (logits at least)")


def _order(report) -> dict:
    return forward_order(report.spec)


def decide(report) -> Verdict:
    runs = tuple(_run_verdict(report, run) for run in report.runs)
    # a probe-named divergence of a run whose only mode is isolated still fails the report
    loose = [d for d in report.diagnosis if d.severity == "divergence"]
    status = FAIL if any(r.status == FAIL for r in runs) or loose else \
        WAIVED if any(r.status == WAIVED for r in runs) else PASS
    routing = tuple(r for r in getattr(report, "routing", ()) or () if r.flips)
    quant = tuple(getattr(report, "quant", ()) or ())
    over = [q for q in quant if not q.within]
    head = _headline(report, status, runs, loose)  # the divergence verdict, quantization apart
    if over:
        head = head + "; " + _over_budget(over).removeprefix("FAIL: ") if status == FAIL else _over_budget(over)
        status = FAIL
    honest = sum(len(r.honest_flips) for r in routing)
    if honest and status != FAIL:
        head += (f"; {honest} token-layer routing flip(s) at honest near-ties (the reference's k-th and (k+1)-th "
                 "probabilities within rounding): downstream compared with that routing")
    return Verdict(status=status, runs=runs, headline=head, routing=routing, quant=quant)


def _over_budget(over) -> str:
    q = over[0]
    more = f" (and {len(over) - 1} more run(s))" if len(over) > 1 else ""
    return (f"FAIL: {q.label} quantization loss over budget: logits KL mean {q.kl_mean:.3g} > {q.budget:g} nats "
            f"({q.weight_type}; its kernels are judged apart, against the reference on its own weights){more}")


def _headline(report, status: str, runs: tuple[RunVerdict, ...], loose: list) -> str:
    if status != FAIL:
        n = len(runs)
        text = f"{status}: {n} run(s) agree with {report.reference} within honest noise"
        honest = sum(r.honest_taps for r in runs)
        if honest:
            text += f" ({honest} tap(s) beyond the fixed table reproduced by the honest runs: honest rounding)"
        partial = [r for r in runs if r.not_compared]
        if partial:
            text += (f"; {sum(len(r.not_compared) for r in partial)} tap(s) of {len(partial)} run(s) not compared "
                     "(declared unavailable)")
        if all(r.basis == "table" for r in runs):
            text = text.replace("within honest noise", "within the fixed table (no honest runs: table-based)")
        notes = sorted({d.cause for d in report.diagnosis if d.severity == "note"})
        waived = sorted({f"{d.impl}@{d.dtype} {d.cause}" for d in report.diagnosis if d.severity == "waived"})
        if notes:
            text += f"; notes: {', '.join(notes)}"
        if waived:
            text += f"; waived: {', '.join(waived)}"
        return text
    lead = next((r for r in runs if r.first is not None), None)
    if lead is not None:
        f = lead.first
        why = lead.explanation
        cause = why.cause if why else "unexplained"
        what = f.reason.split(";")[0] if f.reason else f"{share_text(used(f))} of its bound"
        at = f", decode step {f.step}" if f.step is not None else ""
        return f"FAIL: {lead.label} diverges at {f.tap} ({lead.mode}{at}, {what}): cause {cause}"
    d = loose[0]
    return f"FAIL: {d.impl}@{d.dtype}: cause {d.cause} at {d.tap}, named by a probe (within noise)"


def step_errors(report) -> dict[tuple[str, str, str], list[float]]:
    """Per decode run (impl, dtype, mode), each step's largest share of its bound over every tap and prompt."""
    out: dict = {}
    for r in report.results:
        if r.steps is None:
            continue
        row = out.setdefault((r.impl, r.dtype, r.mode), [0.0] * len(r.steps))
        if len(row) < len(r.steps):
            row += [0.0] * (len(r.steps) - len(row))
        for s, x in enumerate(r.steps):
            row[s] = max(row[s], share(x, r.bound))
    return out

