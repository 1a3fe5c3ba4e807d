"""The per-position logit shift the comparison removed, named as the note `logit-shift`.

parity.compare.pairs compares logits up to a constant per position (unless raw logits are asked for) and
keeps the largest shift it removed in `TapResult.logits["shift"]` (x the row's RMS). Something removed is
never removed silently: when that shift is systematic the diagnosis carries a `logit-shift` note for the
run, whether or not the lm-head probe could run (it needs final_norm and the weights).

Systematic means larger than every error left once it is removed (`TapResult.stat`): a shift that only
rounding made is the mean of a row's errors, so it is never larger than their largest (measured on the
tiny preset: correct ports 5e-8 vs 1.5e-6 in float32, 0.0013 vs 0.04 in bfloat16; a centred unembedding
0.09-0.11 vs the same residuals).
"""

from __future__ import annotations

from parity.diagnose.finding import Finding

CAUSE = "logit-shift"


def shift_notes(report) -> list[Finding]:
    """One `logit-shift` note per (implementation, dtype) whose logits were shifted, unless the diagnosis
    already names it (the lm-head probe's entry says more: it checked the formula)."""
    named = {(d.impl, d.dtype) for d in report.diagnosis if d.cause == CAUSE}
    largest: dict[tuple[str, str], object] = {}
    for r in report.results:
        shift = (getattr(r, "logits", None) or {}).get("shift") if r.tap == "logits" else None
        if shift is None or not shift > r.stat or (r.impl, r.dtype) in named:
            continue
        key = (r.impl, r.dtype)
        if key not in largest or shift > largest[key].logits["shift"]:
            largest[key] = r
    return [Finding(
        impl=r.impl, dtype=r.dtype, tap="logits", cause=CAUSE, severity="note", source="comparison",
        evidence=f"the comparison removed a constant per position from the logits, up to {r.logits['shift']:.3g} "
                 f"x the row RMS ({r.mode}, prompt {r.prompt!r}), more than any error left once it is removed "
                 f"({r.stat:.3g}): the next-token distribution is the same; compare the logits as they are with "
                 "--raw-logits",
    ) for r in largest.values()]
