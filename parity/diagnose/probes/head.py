"""The model's two ends: the embedding's scale, and the output head (tied to the embedding, with the spec's
final softcap)."""

from __future__ import annotations

import math

import numpy as np

from parity.capture.trace import Trace
from parity.diagnose.probes._evidence import (SUBNORMAL, Candidate, Probe, decide, pick, strictly_above,
                                              trusted)
from parity.diagnose.probes._context import matmul_input
from parity.diagnose.probes._registry import ProbeSpec, register
from parity.model.spec import GemmaSpec
from parity.numerics.metrics import np_dtype, round_to
from parity.numerics.tolerances import LM_HEAD_CLOSENESS

EMBED_TIE = strictly_above(0.02)  # a scale multiplied in fp32 is named only when it leads by more than 2%


# ------------------------------------------------------------------ embedding
def probe_embedding(trace: Trace, spec: GemmaSpec, weights: dict, min_agreement: float = 0.98) -> Probe:
    y = trace.taps.get("embed")
    if y is None or "model.embed_tokens.weight" not in weights:
        return Probe.cannot_tell("embedding", "embed", "embed or the embedding weights missing")
    dtype = trace.dtype
    emb = "model.embed_tokens.weight"
    if hasattr(weights, "rows"):  # stored weights: read the prompt's rows, not a 256k-row table
        rows = np.asarray(weights.rows(emb, trace.tokens), np.float64)
    else:
        rows = np.asarray(weights[emb], np.float64)[np.asarray(trace.tokens)]
    rows = round_to(rows, dtype)
    root = math.sqrt(spec.hidden_size)
    rounded = round_to(np.array(root), dtype)
    cands = [Candidate(f"x * sqrt(hidden) rounded to {dtype} ({rounded:.6g})", None, rows * rounded),
             Candidate(f"x * sqrt(hidden) in fp32 ({root:.6g})", "embed-scale-dtype", rows * root, EMBED_TIE),
             Candidate("no scale", "embed-scale-missing", rows)]
    # the normaliser written down as a shorter constant: a bf16 one (mlx-lm's Gemma 3, Google's JAX code) or
    # a decimal one (onnxruntime-genai's builder: np.round(sqrt(hidden), 2)); each only where it differs
    shorter = {} if dtype in ("bfloat16", "float64") else {"a bf16 constant": float(round_to(np.array(root),
                                                                                              "bfloat16"))}
    shorter.update({f"{d} decimal(s)": round(root, d) for d in (1, 2, 3)})
    seen = {float(rounded)}
    for what, c in shorter.items():
        # only where the dtype can tell it from the exact scale (4 units of its rounding): else it ties
        if c not in seen and abs(c - root) > 4 * float(np.finfo(np_dtype(dtype)).eps) * root:
            seen.add(c)
            cands.append(Candidate(f"x * sqrt(hidden) as {what} ({c:.6g})", "embed-scale-rounded", rows * c,
                                   EMBED_TIE))
    keep = trusted(dtype, y, *(c.values for c in cands))  # tiny table entries: subnormal rows or products
    return decide("embedding", "embed", y, cands, dtype, keep, SUBNORMAL, min_agreement,
                  correct=cands[0] if spec.embed_scale else cands[2], says="embedding is {best}",
                  unexplained="no candidate explains the embedding (best {score:.1%})")


# ------------------------------------------------------------------ output head
def probe_lm_head(trace: Trace, spec: GemmaSpec, weights: dict, min_agreement: float = 0.95) -> Probe:
    """logits = softcap(final_norm @ embedding^T): tied head, with the spec's final softcap.

    Besides the correct formula: no softcap (final-softcap-missing), the softcap applied to the final
    norm's output instead (softcap-misplaced), the correct logits shifted by a constant per position (a
    centred unembedding: logit-shift, the same distribution), and, only when none of those holds and the
    logits do not even lie in the span of the embedding's columns, a head that is not the embedding
    (lm-head-untied: evidence that the head's weight differs, not just that something did).
    """
    x, y = trace.taps.get("final_norm"), trace.taps.get("logits")
    if x is None or y is None or "model.embed_tokens.weight" not in weights:
        return Probe.cannot_tell("lm-head", "logits", "final_norm or logits not captured")
    dtype = trace.dtype
    head = round_to(weights.get("lm_head.weight", weights["model.embed_tokens.weight"]), dtype)
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    raw = matmul_input(x) @ head.T  # [T, vocab]
    cap = spec.final_softcap
    cands = [Candidate("tied head, no softcap", "final-softcap-missing" if cap else None, raw)]
    if cap:
        cands += [Candidate(f"tied head, softcap {cap:g}", None, np.tanh(raw / cap) * cap),
                  Candidate(f"softcap {cap:g} on final_norm, then tied head", "softcap-misplaced",
                            matmul_input(np.tanh(x64 / cap) * cap) @ head.T)]
    expected = next(c for c in cands if c.cause is None)
    # a matmul in low precision accumulates differently: judge by closeness, not bits
    scale = np.sqrt(np.mean(y64**2)) or 1.0
    tol = LM_HEAD_CLOSENESS[dtype]

    def close(v) -> float:
        return float(np.mean(np.abs(y64 - v) <= tol * scale))

    scores = {c.label: close(c.values) for c in cands}
    best, score, _ = pick(scores, expected.label)
    found = next(c for c in cands if c.label == best)
    ev = {"agreement": {k: round(v, 4) for k, v in scores.items()}}
    if score >= min_agreement:
        if found.cause is None:
            return Probe.ok("lm-head", "logits", f"logits are {best}", ev)
        if found.cause == "softcap-misplaced":
            return Probe.named("lm-head", "logits", f"logits are {best}: the final softcap caps the final norm's "
                               "output, not the logits", cause="softcap-misplaced", evidence=ev)
        return Probe.named("lm-head", "logits", f"logits are {best}, the spec has a final softcap",
                           cause="final-softcap-missing", evidence=ev)
    want = expected.values
    shift = np.mean(y64 - want, axis=-1, keepdims=True)  # [T, 1]: one constant per position
    ev["agreement with the per-position shift removed"] = round(close(want + shift), 4)
    if close(want + shift) >= min_agreement:
        ev["largest shift"] = float(np.max(np.abs(shift)))
        return Probe.named("lm-head", "logits", "logits are the correct ones shifted by a constant per position (a "
                           "centred unembedding): the next-token distribution is the same", cause="logit-shift",
                           evidence=ev)
    # a tied head capped at another value (a runtime that kept its default cap: mlx-lm's Gemma 2 ModelArgs has
    # 30.0): not an untied head; left to the counterfactuals and to the effective configuration to name
    c = _fit_cap(raw, y64)
    if c is not None and close(np.tanh(raw / c) * c) >= min_agreement and (not cap or abs(c / cap - 1) > 0.05):
        ev["final softcap that fits"] = round(c, 4)
        return Probe.named("lm-head", "logits", f"logits are the tied head with a final softcap of about {c:.3g}"
                           + (f", where the spec caps at {cap:g}" if cap else ", where the spec has none"),
                           cause="unexplained", evidence=ev)
    if head.size <= 5e7:  # the span test solves a [vocab, hidden] least squares: skipped at real vocabularies
        z, *_ = np.linalg.lstsq(head, y64.T, rcond=None)  # [hidden, T]
        resid = float(np.linalg.norm(head @ z - y64.T) / (np.linalg.norm(y64) or 1.0))
        ev["share of the logits outside the embedding's span"] = round(resid, 4)
        if resid < 10 * tol:
            return Probe.named("lm-head", "logits", "logits lie in the span of the embedding (a tied head) but are "
                               "not final_norm times it: the head's input is not the captured final_norm",
                               cause="unexplained", evidence=ev)
    return Probe.named("lm-head", "logits", "logits are not final_norm times the embedding, nor in its span: the "
                       "head is not tied to the embedding", cause="lm-head-untied", evidence=ev)


def _fit_cap(raw: np.ndarray, y: np.ndarray) -> float | None:
    """The softcap c with y = c * tanh(raw / c) closest (mean |error|), searched on a log grid and refined."""
    lo, hi = np.log(0.1), np.log(1000.0)
    best = None
    for _ in range(4):  # 40 points a round, each round 1/20 of the last one's width around its best
        grid = np.exp(np.linspace(lo, hi, 41))
        errs = [float(np.mean(np.abs(y - np.tanh(raw / c) * c))) for c in grid]
        k = int(np.argmin(errs))
        best = float(grid[k])
        step = (hi - lo) / 40
        lo, hi = np.log(best) - step, np.log(best) + step
    return best if best is not None and np.isfinite(best) else None


register(ProbeSpec("embedding", probe_embedding, "embed", per_layer=False,
                   causes=("embed-scale-missing", "embed-scale-dtype", "embed-scale-rounded", "unexplained")))
register(ProbeSpec("lm_head", probe_lm_head, "logits", per_layer=False,
                   causes=("final-softcap-missing", "softcap-misplaced", "logit-shift", "lm-head-untied",
                           "unexplained")))
