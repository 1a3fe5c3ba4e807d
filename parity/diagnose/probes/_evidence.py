"""What every probe shares: the result it returns, its candidates, what a dtype can carry, and the one ending.

A probe evaluates candidate formulas on the very input the implementation used,
so no upstream error leaks in. In float32/float64 a candidate "matches" when its
error is a few ulps; in bfloat16/float16 the candidates are rounded to the dtype
and compared bit for bit, and the agreement rate decides (an exact vs tanh GELU
differs by less than one bf16 ulp on most elements, so only the rate over many
elements tells them apart).

A probe concludes only from what the dtype can carry. Values in the subnormal
range (nonzero, below the dtype's smallest normal) are left out of every
agreement: hardware may flush them to zero and they keep only a few bits
(`trusted`). The evidence says how many elements were left out and why; when
fewer than MIN_TRUSTED remain (and most of the tensor was left out), the probe
says "cannot tell" instead of deciding on a handful.

`decide` is the ending the candidate probes share: agreement on the trusted
elements, the tie rule (`pick`), too few trusted elements, no candidate at all.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from parity.diagnose.causes import CAUSE_IDS, DOC_PATH
from parity.numerics.metrics import round_to, ulp_of
from parity.numerics.tolerances import FORMATS

Status = Literal["ok", "cause", "cannot-tell"]
STATUSES: tuple[str, ...] = ("ok", "cause", "cannot-tell")

ULPS_WIDE = 16  # fp32/fp64: several ops each round; 16 ulps is still far below any real fault


class ProbeDefinitionError(Exception):
    """A probe is written wrong (a status without its cause, two candidates with one label, an undeclared
    cause). Not a ValueError on purpose: `run_probes` reads a ValueError as taps that do not fit, and a bug
    in a probe must never read as "cannot tell"."""


class UnknownCauseError(ProbeDefinitionError, LookupError):
    """A probe, candidate or registry entry names a cause id that the catalogue lacks."""


def known_cause(cause: str, where: str) -> str:
    """`cause` when it is a catalogue id, else UnknownCauseError naming it, the catalogue and the fix."""
    if isinstance(cause, str) and cause in CAUSE_IDS:
        return cause
    raise UnknownCauseError(f"{where}: cause {cause!r} is not in the catalogue (parity/diagnose/causes.py, "
                            f"{DOC_PATH}); add its row there first, or use one of {', '.join(sorted(CAUSE_IDS))}")


@dataclass(frozen=True)
class Probe:
    """One probe's result on one tap. `status` is set where the probe decides; nothing parses `verdict`.

    `verdict` is the sentence for people (report.json's key of the same name); `cause` a catalogue id when
    `status` is "cause" (`unexplained` when no candidate matched), else None; `evidence` the numbers behind
    it; `finding` the candidate that matched, where the probe reports one.
    """

    name: str
    tap: str
    status: Status
    verdict: str
    cause: str | None = None
    evidence: Mapping = field(default_factory=dict)
    finding: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ProbeDefinitionError(f"probe {self.name!r}: status {self.status!r} is not one of {STATUSES}")
        if (self.status == "cause") != (self.cause is not None):
            raise ProbeDefinitionError(f"probe {self.name!r} at {self.tap}: status {self.status!r} with cause "
                                       f"{self.cause!r}; a cause goes with status 'cause' and only with it")
        if self.cause is not None:
            known_cause(self.cause, f"probe {self.name!r} at {self.tap}")

    @classmethod
    def ok(cls, name: str, tap: str, verdict: str, evidence: Mapping | None = None,
           finding: str | None = None) -> Probe:
        """The operation is right (or right within what the dtype can show)."""
        return cls(name, tap, "ok", verdict, None, evidence if evidence is not None else {}, finding)

    @classmethod
    def named(cls, name: str, tap: str, verdict: str, cause: str, evidence: Mapping | None = None,
              finding: str | None = None) -> Probe:
        """The evidence names `cause` (a catalogue id)."""
        return cls(name, tap, "cause", verdict, cause, evidence if evidence is not None else {}, finding)

    @classmethod
    def of(cls, name: str, tap: str, verdict: str, cause: str | None, evidence: Mapping | None = None,
           finding: str | None = None) -> Probe:
        """ok when `cause` is None, else named."""
        return cls(name, tap, "ok" if cause is None else "cause", verdict, cause,
                   evidence if evidence is not None else {}, finding)

    @classmethod
    def cannot_tell(cls, name: str, tap: str, why: str, evidence: Mapping | None = None) -> Probe:
        """The evidence does not decide; the verdict reads "cannot tell: <why>"."""
        return cls(name, tap, "cannot-tell", f"cannot tell: {why}", None, evidence if evidence is not None else {})

    def to_json(self) -> dict:
        """report.json's probe entry: name, tap, verdict, cause, evidence, finding (the keys it always had)."""
        return {"name": self.name, "tap": self.tap, "verdict": self.verdict, "cause": self.cause,
                "evidence": copy.deepcopy(dict(self.evidence)), "finding": self.finding}

    def sentence(self) -> str:
        ev = ", ".join(f"{k} {_fmt(v)}" for k, v in self.evidence.items())
        return f"{self.tap}: {self.verdict} ({ev})"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


@dataclass(frozen=True, eq=False)  # eq=False: values is an array
class Candidate:
    """One formula a probe tries. `cause` is what it means when it explains the data: None for Gemma's own
    formula, else a catalogue id, checked here; code reads it, never the label.

    `min_lead`: how far its agreement must lead the runner-up's before it counts as found. Below that the
    dtype cannot tell it from the others: its cause is not named (a precision variant within rounding of
    the correct formula), and the probe's `tied` sentence, if it has one, says so.
    """

    label: str  # for people: "tanh, rounded once"
    cause: str | None
    values: np.ndarray | None = None  # None: scored by the probe itself (see `decide`'s `also`)
    min_lead: float = 0.0

    def __post_init__(self) -> None:
        if self.cause is not None:
            known_cause(self.cause, f"candidate {self.label!r}")


# ------------------------------------------------------------------ rounding
def agreement(actual: np.ndarray, candidate: np.ndarray, dtype: str, keep: np.ndarray | None = None) -> float:
    """Share of elements (of those `keep` marks, default all) where the candidate, in `dtype`, equals
    what the implementation gave."""
    a = np.asarray(actual, dtype=np.float64)
    c = round_to(candidate, dtype)
    if keep is not None:
        a, c = a[keep], c[keep]
    if a.size == 0:
        return 0.0
    if dtype in ("bfloat16", "float16"):
        return float(np.mean(a == c))
    # an absolute floor at the tensor's scale: a formula with cancellation (exact GELU's
    # 0.5 * x * (1 + erf) at x = -3) loses relative precision on its tiny outputs
    floor = ulp_of(np.array(np.sqrt(np.mean(c * c))), dtype)
    with np.errstate(invalid="ignore"):  # inf - inf: equal infinities agree through a == c
        return float(np.mean((a == c) | (np.abs(a - c) <= ULPS_WIDE * (ulp_of(c, dtype) + floor))))


# ------------------------------------------------------------------ what a dtype can carry
SMALLEST_NORMAL = {k: f.smallest_normal for k, f in FORMATS.items()}
UNIT_ROUNDOFF = {k: f.unit_roundoff for k, f in FORMATS.items()}
# At 98% a decision needs about a hundred elements: on fewer, one or two mismatches move a rate past the bar.
MIN_TRUSTED = 100
SUBNORMAL = "a value in the subnormal range"


def trusted(dtype: str, *arrays: np.ndarray) -> np.ndarray:
    """Elements that every array, rounded to `dtype`, holds as 0 or a normal number (or a non-finite).

    A subnormal result is not evidence for or against a formula: flush-to-zero
    hardware gives 0 there, and it keeps only a few bits, so a candidate and a
    correct implementation can differ on it for reasons no formula explains.
    """
    keep = None
    for a in arrays:
        r = np.abs(round_to(a, dtype))
        ok = ~((r > 0) & (r < SMALLEST_NORMAL[dtype]))
        keep = ok if keep is None else keep & ok
    return keep


def record_trust(ev: dict, keep: np.ndarray, why: str) -> None:
    """Record in the evidence how many elements a probe decided on, and why the others were left out."""
    n, k = int(keep.size), int(np.count_nonzero(keep))
    ev["elements"], ev["trusted"] = n, k
    if k < n:
        ev["excluded"], ev["excluded because"] = n - k, why


def too_few(name: str, tap: str, dtype: str, keep: np.ndarray, why: str, ev: dict) -> Probe | None:
    """ "cannot tell" when leaving out what the dtype cannot carry left fewer than MIN_TRUSTED elements,
    and took most of the tensor.

    A small tensor (hypothesis draws 2 tokens of 8 channels) with a few elements
    left out is decided on as small tensors always were: every remaining element
    is evidence, and the probes' tie rules cover small inputs.
    """
    n, k = int(keep.size), int(np.count_nonzero(keep))
    if k < MIN_TRUSTED and k < n / 2:
        return Probe.cannot_tell(name, tap, f"only {k} of {n} elements are trustworthy in {dtype} ({why})", ev)
    return None


TIE_MARGIN = 0.005  # the correct candidate wins any tie within half a percent of the elements


def pick(scores: Mapping[str, float], correct: str | None = None) -> tuple[str, float, float]:
    """Best candidate (by label), its score, and its lead over the runner-up.

    When the correct candidate explains the data as well as the best (within
    TIE_MARGIN), it is chosen: tiny tensors or small activations make several
    candidates agree, and a tie is no evidence of a fault.
    """
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    best, s = ranked[0]
    if correct in scores and scores[correct] >= s - TIE_MARGIN:
        best, s = correct, scores[correct]
    second = max((v for k, v in scores.items() if k != best), default=0.0)
    return best, s, s - second


# ------------------------------------------------------------------ the shared ending
def decide(name: str, tap: str, actual: np.ndarray, candidates: Sequence[Candidate], dtype: str,
           keep: np.ndarray, why: str, min_agreement: float, *, correct: Candidate, says: str,
           unexplained: str, tied: str | None = None, also: Sequence[tuple[Candidate, float]] = (),
           extra: Mapping | None = None, lead_as=None, with_finding: bool = False) -> Probe:
    """Score each candidate's agreement with `actual` on the `keep` elements and conclude.

    In order: too few trusted elements -> cannot tell; the best (`pick`, the `correct` candidate winning
    ties) below `min_agreement` -> `unexplained`; the best leading the runner-up by less than its
    `min_lead` -> no cause (and the `tied` sentence where given); else the best candidate's cause.

    `also`: candidates the probe scored itself (on other inputs), ranked with the rest. Sentences are
    format strings over `best` (the label) and `score`. The evidence holds the agreement of every
    candidate, the lead (when `lead_as` says how to write it), `extra`, then the trust counts.
    """
    scored = [(c, agreement(actual, c.values, dtype, keep)) for c in candidates] + list(also)
    by_label = {c.label: c for c, _ in scored}
    if len(by_label) != len(scored):
        raise ProbeDefinitionError(f"probe {name!r}: two candidates share a label; give each its own")
    scores = {c.label: s for c, s in scored}
    best, score, lead = pick(scores, correct.label)
    ev: dict = {"agreement": {k: round(v, 4) for k, v in scores.items()}}
    if lead_as is not None:
        ev["lead"] = lead_as(lead)
    ev.update(extra or {})
    record_trust(ev, keep, why)
    if (few := too_few(name, tap, dtype, keep, why, ev)) is not None:
        return few
    if score < min_agreement:
        return Probe.named(name, tap, unexplained.format(best=best, score=score), cause="unexplained",
                           evidence=ev)
    found = by_label[best]
    finding = best if with_finding else None
    if lead < found.min_lead:
        return Probe.ok(name, tap, (tied or says).format(best=best, score=score), ev, finding=finding)
    return Probe.of(name, tap, says.format(best=best, score=score), cause=found.cause, evidence=ev,
                    finding=finding)


def strictly_above(x: float) -> float:
    """The min_lead of a candidate that must lead by more than `x`, not by `x` or more."""
    return math.nextafter(x, math.inf)
