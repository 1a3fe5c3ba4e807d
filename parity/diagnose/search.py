"""One ranking of counterfactuals, for the prefill and the decode path alike.

A search re-runs the correct port with one change at a time (parity.diagnose.counterfactuals) and scores how
well each reproduces an implementation's trace: the worst share of its bound used, through the divergent layer
(and, decoding, the divergent step). The unchanged port is scored first: when it already reproduces the trace,
the "divergence" is honest rounding and no candidate is run. A candidate that raises is a failed candidate,
kept with its error and reported: never a silent drop. So is one that compares no tap (a score of None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from parity.numerics.display import share_text

KEEP = 5  # candidates kept in `ranked`, best first
ERROR_CHARS = 200  # of each failure's message: enough for the exception's type and first clause
UNCHANGED = "unchanged port"  # the baseline's label among the failures


class Candidate(Protocol):  # parity.diagnose.counterfactuals.Counterfactual
    cause: str
    label: str


@dataclass(frozen=True)
class Ranking:
    best: Candidate | None
    score: float | None  # the best candidate's share of the bound through the divergent layer (and step)
    runner_up: Candidate | None
    runner_up_score: float | None
    baseline: float | None  # the unchanged port's own share (None: it could not be scored)
    ranked: tuple[tuple[str, float], ...] = ()  # (label, score), best first, the first KEEP
    failed: tuple[tuple[str, str], ...] = ()  # (label, error): candidates that could not run, always reported

    @property
    def honest(self) -> bool:
        """The unchanged port reproduces the trace: honest rounding, no single change needed."""
        return self.baseline is not None and self.baseline <= 1.0

    @property
    def explains(self) -> bool:
        """The best change brings the error into honest noise and the unchanged port does not."""
        return not self.honest and self.score is not None and self.score <= 1.0

    def failures(self) -> list[dict]:
        """The failed candidates as report.json writes them (a diagnosis entry's "failed")."""
        return [{"candidate": label, "error": error} for label, error in self.failed]


def rank(candidates: Iterable[Candidate], reproduce: Callable[[Candidate | None], float | None],
         keep: int = KEEP) -> Ranking:
    """Score the unchanged port (`reproduce(None)`), then, unless it reproduces the trace, every candidate.

    Ties keep the candidates' order. An exception, or a score of None (nothing compared), makes a failed
    candidate: listed in `failed` with its error, never dropped.
    """
    failed: list[tuple[str, str]] = []

    def attempt(cf: Candidate | None) -> float | None:
        label = cf.label if cf is not None else UNCHANGED
        try:
            score = reproduce(cf)
        except Exception as e:  # noqa: BLE001 -- a variant that cannot be built or run is reported, not dropped
            failed.append((label, f"{type(e).__name__}: {e}"[:ERROR_CHARS]))
            return None
        if score is None:
            failed.append((label, "no tap compared: the variant's trace shares none of the implementation's taps"))
        return score

    baseline = attempt(None)
    if baseline is not None and baseline <= 1.0:
        # the correct port reproduces it: no single change can explain it better (and at real sizes each
        # candidate is a model run), so the candidates are not run
        return Ranking(None, None, None, None, baseline, failed=tuple(failed))
    scored = [(sc, cf) for cf in candidates if (sc := attempt(cf)) is not None]
    scored.sort(key=lambda x: x[0])  # stable: ties keep the candidates' order
    (score, best), (runner_score, runner) = (scored + [(None, None)] * 2)[:2]
    return Ranking(best, score, runner, runner_score, baseline,
                   tuple((cf.label, sc) for sc, cf in scored[:keep]), tuple(failed))


def failed_text(ranking: Ranking) -> str:
    """The clause every evidence sentence ends with when candidates could not run (empty when all ran)."""
    if not ranking.failed:
        return ""
    (label, error), more = ranking.failed[0], len(ranking.failed) - 1
    return (f"; {len(ranking.failed)} candidate(s) could not be run (first: {label!r}: {error}"
            + (f"; {more} more in this entry's 'failed'" if more else "") + ")")


@dataclass(frozen=True)
class Wording:
    """What a path calls its re-runs in the evidence sentence (the prefill's and the decode's)."""
    rerun: str  # "the reference re-run with": followed by the candidate's label
    through: str  # how far the score compares: "the layer's end"
    nothing: str  # said when no candidate explains it
    correct: str  # the unchanged port, with {dtype}: "the correct port run in {dtype}"


def named(ranking: Ranking, where: str, dtype: str, wording: Wording) -> dict:
    """A Finding's cause, source, evidence (and failed, when candidates could not run) from a ranking, as keyword
    arguments."""
    failed = {"failed": ranking.failed} if ranking.failed else {}
    if ranking.explains:
        runner = (f"; next best {ranking.runner_up.label!r} uses {share_text(ranking.runner_up_score)}"
                  if ranking.runner_up is not None else "")
        return {"cause": ranking.best.cause, "source": "counterfactual",
                "evidence": f"{where}; {wording.rerun} {ranking.best.label!r} reproduces it within honest noise "
                            f"({share_text(ranking.score)} of the bound through {wording.through}){runner}"
                            + failed_text(ranking), **failed}
    if ranking.honest:
        closest = (f"; {wording.correct.format(dtype=dtype)} reproduces it ({share_text(ranking.baseline)} of the "
                   "bound): honest rounding at this tap, not a wrong formula")
    else:
        top = ranking.ranked[:3]
        closest = ("; closest single changes: " + ", ".join(f"{lab!r} {share_text(sc)}" for lab, sc in top)
                   if top else "")
    return {"cause": "unexplained", "source": "first-divergence",
            "evidence": f"{where}; {wording.nothing}{closest}{failed_text(ranking)}", **failed}
