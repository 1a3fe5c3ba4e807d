"""The one shape of a diagnosis entry (report.json's `diagnosis`), and of a run's probe result (`probes`).

Every place that names a cause builds a `Finding`; every later stage (the verdict, waivers, the baseline gate,
the four renderers) reads its fields. `to_json` is the report.json contract, written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["divergence", "note", "waived"]
Source = Literal["probe", "counterfactual", "first-divergence", "comparison"]
SEVERITIES = ("divergence", "note", "waived")
SOURCES = ("probe", "counterfactual", "first-divergence", "comparison")  # comparison: parity.diagnose.logit_shift


@dataclass(frozen=True)
class Finding:
    impl: str
    dtype: str
    tap: str
    cause: str  # an id of parity.diagnose.causes.CAUSES ("unexplained" when nothing names it)
    severity: Severity
    source: Source
    evidence: str  # for people; nothing parses it
    mode: str = "cumulative"
    explains: str | None = None  # the first divergence (its tap) this entry explains; None: it explains none
    step: int | None = None  # decode runs: the step of the first divergence
    waived: str = ""  # the waiver's note, when a waiver accepts it (severity "waived")
    waiver_expired: str = ""  # an expired waiver that covered it: renew or remove it
    failed: tuple[tuple[str, str], ...] = ()  # counterfactual candidates that could not run: (label, error)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r}: one of {SEVERITIES}")
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r}: one of {SOURCES}")

    @property
    def run(self) -> tuple[str, str, str]:
        return self.impl, self.dtype, self.mode

    def to_json(self) -> dict:
        """report.json's diagnosis entry: the keys it has always had, the optional ones only when set."""
        out = {"impl": self.impl, "dtype": self.dtype, "cause": self.cause, "tap": self.tap,
               "evidence": self.evidence, "severity": self.severity, "source": self.source}
        if self.mode != "cumulative":
            out["mode"] = self.mode
        if self.step is not None:
            out["step"] = self.step
        if self.explains is not None:
            out["explains"] = self.explains
        if self.waived:
            out["waived"] = self.waived
        if self.waiver_expired:
            out["waiver_expired"] = self.waiver_expired
        if self.failed:
            out["failed"] = [{"candidate": c, "error": e} for c, e in self.failed]
        return out


@dataclass(frozen=True)
class RunProbe:
    """One probe's result on one run (report.json's `probes` entry)."""

    impl: str
    dtype: str
    probe: object  # parity.diagnose.probes.Probe

    @property
    def status(self) -> str:
        return self.probe.status

    @property
    def cause(self) -> str | None:
        return self.probe.cause

    @property
    def tap(self) -> str:
        return self.probe.tap

    def to_json(self) -> dict:
        return {"impl": self.impl, "dtype": self.dtype, **self.probe.to_json()}
