"""Probes: look at one operation of one implementation, on its own captured input and output.

No upstream error leaks in, because the candidates are evaluated on the very
input the implementation used. In float32/float64 a candidate "matches" when
its error is a few ulps; in bfloat16/float16 the candidates are rounded to the
dtype and compared bit for bit, and the agreement rate decides (an exact vs
tanh GELU differs by less than one bf16 ulp on most elements, so only the
rate over many elements tells them apart).

Each probe returns a `Probe`: a verdict, the cause id it implies (or None when
the implementation is correct), and the numbers that support it.

A probe concludes only from what the dtype can carry. Values in the subnormal
range (nonzero, below the dtype's smallest normal) are left out of every
agreement: hardware may flush them to zero and they keep only a few bits
(`trusted`). Where a formula cancels in the implementation's working precision
(GELU's 1 + tanh near 0, see `gelu_trusted`), those elements are left out too.
The evidence says how many elements were left out and why; when fewer than
MIN_TRUSTED remain (and most of the tensor was left out), the probe says
"cannot tell" (cause None) instead of deciding on a handful. The attention-mask probe reads the mask off the scores'
-inf pattern where scores are exposed, and never reads a zero probability that
could be an underflow as a masked key (see `probe_attention_mask`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from parity.numerics.metrics import np_dtype, round_to, ulp_of  # noqa: F401 -- round_to: used here and named here
from parity.numerics.tolerances import FORMATS, LM_HEAD_CLOSENESS
from parity.model.spec import GemmaSpec
from parity.capture.trace import ReducedTap, Trace

ULPS_WIDE = 16  # fp32/fp64: several ops each round; 16 ulps is still far below any real fault


@dataclass
class Probe:
    name: str
    tap: str
    verdict: str  # for people
    cause: str | None  # a docs/causes.md id, or None when this operation is right
    evidence: dict = field(default_factory=dict)
    finding: str | None = None  # the candidate that matched (e.g. "tanh, rounded once"), where there are candidates

    @property
    def status(self) -> str:
        """For code, not prose: "cannot-tell" (the evidence does not decide), "cause" (a cause id is named:
        `unexplained` when no candidate matched) or "ok"."""
        if self.verdict.startswith("cannot tell"):
            return "cannot-tell"
        return "cause" if self.cause else "ok"

    def to_json(self) -> dict:
        return asdict(self)

    def sentence(self) -> str:
        ev = ", ".join(f"{k} {_fmt(v)}" for k, v in self.evidence.items())
        return f"{self.tap}: {self.verdict} ({ev})"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


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


def _trust(ev: dict, keep: np.ndarray, why: str) -> None:
    """Record in the evidence how many elements a probe decided on, and why the others were left out."""
    n, k = int(keep.size), int(np.count_nonzero(keep))
    ev["elements"], ev["trusted"] = n, k
    if k < n:
        ev["excluded"], ev["excluded because"] = n - k, why


def _too_few(name: str, tap: str, dtype: str, keep: np.ndarray, why: str, ev: dict) -> Probe | None:
    """ "cannot tell" when leaving out what the dtype cannot carry left fewer than MIN_TRUSTED elements,
    and took most of the tensor.

    A small tensor (hypothesis draws 2 tokens of 8 channels) with a few elements
    left out is decided on as small tensors always were: every remaining element
    is evidence, and the probes' tie rules cover small inputs.
    """
    n, k = int(keep.size), int(np.count_nonzero(keep))
    if k < MIN_TRUSTED and k < n / 2:
        return Probe(name, tap, f"cannot tell: only {k} of {n} elements are trustworthy in {dtype} ({why})",
                     None, ev)
    return None


SUBNORMAL = "a value in the subnormal range"


TIE_MARGIN = 0.005  # the correct candidate wins any tie within half a percent of the elements


def _pick(scores: dict[str, float], correct: str | None = None) -> tuple[str, float, float]:
    """Best candidate, its score, and its lead over the runner-up.

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


# ------------------------------------------------------------------ GELU
def gelu_exact(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_tanh_op_by_op(x: np.ndarray, dtype: str) -> np.ndarray:
    """jax.nn.gelu(approximate=True)'s order, every op rounded to `dtype`."""
    t = np_dtype(dtype)
    xv = np.asarray(x, dtype=np.float64).astype(t)
    c = t(math.sqrt(2.0 / math.pi))
    cube = (xv * xv) * xv
    inner = c * (xv + t(0.044715) * cube)
    cdf = t(0.5) * (t(1.0) + np.tanh(inner).astype(t))
    return (xv * cdf).astype(np.float64)


def gelu_candidates(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    c = {"tanh, rounded once": gelu_tanh(x), "exact, rounded once": gelu_exact(x)}
    if dtype in ("bfloat16", "float16"):
        c["tanh, op by op in " + dtype] = gelu_tanh_op_by_op(x, dtype)
    return c


# The candidates are exact in float64, but an implementation computes GELU's cdf, 0.5 * (1 + t) with
# t = tanh(...) or erf(...), in fp32 (torch and XLA upcast bf16/fp16 elementwise ops; an op-by-op
# implementation is its own candidate). fp32 tanh/erf are good to a few ulps, an absolute error of about
# CDF_WORKING_ERROR = 2^-22 on t (|t| <= 1, the fp32 ulp below 1 is 2^-24), so 1 + t carries a relative
# error of eps = 2^-22 / (1 + t) for negative x, where t -> -1 and 1 + t cancels. Rounding that cdf to a
# dtype of unit roundoff u (bf16 2^-8, fp16 2^-11) flips the last bit on about eps / u of the elements, so
# a correct implementation misses bit-for-bit agreement there for reasons no candidate explains. An
# element is trusted when eps / u <= 1/16 (CDF_FLIP_SHARE), i.e. 1 + t >= 16 * 2^-22 / u:
#   bf16: 1 + t >= 2^-10, x >= -3.25;    fp16: 1 + t >= 2^-7, x >= -2.65.
# Measured with torch's bf16 GELU against the float64 candidate rounded once: agreement is 100% above -3,
# 97% on [-3.5, -3), 82% on [-4, -3.5) and near 0 on [-8, -4.5) (where fp32's 1 + erf has one or two bits
# left, and float64's own 1 + erf reaches 0 below -8.5). fp32/fp64 traces are compared within ULPS_WIDE
# with an absolute floor at the tensor's scale, which already absorbs the cancellation: nothing is left out.
CDF_WORKING_ERROR = 2.0**-22
CDF_FLIP_SHARE = 1 / 16


def gelu_cdf_floor(dtype: str) -> float:
    """Smallest 1 + t (t = tanh(...) or erf(...)) at which a GELU in `dtype` is trusted bit for bit."""
    return CDF_WORKING_ERROR / (CDF_FLIP_SHARE * UNIT_ROUNDOFF[dtype])


def gelu_trusted(x: np.ndarray, dtype: str, cands: dict[str, np.ndarray], actual: np.ndarray) -> np.ndarray:
    """Elements where GELU's candidates can be held to the implementation's output in `dtype`."""
    from scipy.special import erfc, expit

    keep = trusted(dtype, actual, *cands.values())
    if dtype in ("bfloat16", "float16"):
        x = np.asarray(x, np.float64)
        # 1 + t computed without cancellation: 1 + erf(x / sqrt 2) = erfc(-x / sqrt 2), 1 + tanh(z) = 2 expit(2z)
        one_plus_erf = erfc(-x / math.sqrt(2.0))
        one_plus_tanh = 2.0 * expit(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))
        keep = keep & (np.minimum(one_plus_erf, one_plus_tanh) >= gelu_cdf_floor(dtype))
    return keep


def _gelu_why(dtype: str) -> str:
    if dtype in ("bfloat16", "float16"):
        return f"1 + tanh or 1 + erf below {gelu_cdf_floor(dtype):.3g} cancels in fp32, or {SUBNORMAL}"
    return SUBNORMAL


def probe_gelu(trace: Trace, layer: int, min_agreement: float = 0.98) -> Probe:
    """Which GELU maps this implementation's own mlp.gate to its own mlp.act.

    Decided on the elements the dtype can be trusted with (`gelu_trusted`): where
    the gate is so negative that 1 + tanh cancels, even the right formula misses
    bit-for-bit agreement, so those elements are left out and counted in the evidence.
    """
    tap = f"layers.{layer}.mlp.act"
    x, y = trace.taps.get(f"layers.{layer}.mlp.gate"), trace.taps.get(tap)
    if x is None or y is None:
        return Probe("gelu", tap, "cannot tell: mlp.gate or mlp.act not captured", None)
    dtype = trace.dtype
    cands = gelu_candidates(x, dtype)
    keep = gelu_trusted(x, dtype, cands, y)
    scores = {k: agreement(y, v, dtype, keep) for k, v in cands.items()}
    # the same candidates applied to the up projection tell a swapped GeGLU apart
    up = trace.taps.get(f"layers.{layer}.mlp.up")
    if up is not None and up.shape == x.shape:
        up_cands = gelu_candidates(up, dtype)
        up_keep = gelu_trusted(up, dtype, up_cands, y)
        scores["gelu applied to mlp.up"] = max(agreement(y, v, dtype, up_keep) for v in up_cands.values())
    best, score, lead = _pick(scores, "tanh, rounded once")
    evidence = {"agreement": {k: round(v, 4) for k, v in scores.items()}, "lead": lead}
    _trust(evidence, keep, _gelu_why(dtype))
    if (few := _too_few("gelu", tap, dtype, keep, _gelu_why(dtype), evidence)) is not None:
        return few
    if score < min_agreement:
        return Probe("gelu", tap, f"no GELU candidate explains mlp.act (best {best!r} at {score:.1%})",
                     "unexplained", evidence)
    cause = {"tanh, rounded once": None, "exact, rounded once": "gelu-exact",
             "gelu applied to mlp.up": "geglu-swapped"}.get(best, "act-lowp")
    if best == "exact, rounded once" or best.startswith("tanh"):
        # within a dtype, exact and tanh can tie when every input is tiny; say so instead of guessing
        if lead < 1e-3:
            return Probe("gelu", tap, f"{best} and the runner-up agree equally ({score:.1%}): inputs too small to tell",
                         None, evidence, finding=best)
    return Probe("gelu", tap, f"GELU is {best}", cause, evidence, finding=best)


# ------------------------------------------------------------------ GeGLU
def probe_geglu(trace: Trace, spec: GemmaSpec, layer: int, min_agreement: float = 0.98) -> Probe:
    """Widths of both projections, and whether mlp.hidden is act * up."""
    p = f"layers.{layer}.mlp."
    gate, up, act, hidden = (trace.taps.get(p + k) for k in ("gate", "up", "act", "hidden"))
    tap = p + "hidden"
    if any(v is None for v in (gate, up, act, hidden)):
        return Probe("geglu", tap, "cannot tell: an MLP tap is missing", None)
    widths = {"gate": int(gate.shape[-1]), "up": int(up.shape[-1]), "hidden": int(hidden.shape[-1]),
              "spec intermediate_size": spec.intermediate_size}
    if len({widths["gate"], widths["up"], widths["hidden"], spec.intermediate_size}) != 1:
        # the widths are read at the projections: the first tap they change is the gate's
        return Probe("geglu", p + "gate", f"projection widths {widths} do not all equal intermediate_size",
                     "geglu-width", {"widths": widths})
    dtype = trace.dtype
    # act * up of two dtype values is exact in fp32 and rounded once, so every product the dtype holds as
    # a normal number is a fair test; a subnormal product (a tiny GELU output times a small up) is not
    cands = {"act * up": np.asarray(act, np.float64) * up, "act * gate": np.asarray(act, np.float64) * gate}
    keep = trusted(dtype, hidden, *cands.values())
    scores = {k: agreement(hidden, v, dtype, keep) for k, v in cands.items()}
    best, score, lead = _pick(scores, "act * up")
    evidence = {"agreement": {k: round(v, 4) for k, v in scores.items()}, "widths": widths}
    _trust(evidence, keep, SUBNORMAL)
    if (few := _too_few("geglu", tap, dtype, keep, SUBNORMAL, evidence)) is not None:
        return few
    if score < min_agreement:
        return Probe("geglu", tap, f"mlp.hidden is neither act * up nor act * gate (best {score:.1%})",
                     "unexplained", evidence)
    return Probe("geglu", tap, f"mlp.hidden = {best}", None if best == "act * up" else "geglu-swapped", evidence)


# ------------------------------------------------------------------ residual structure
def _close(actual: np.ndarray, expected: np.ndarray, dtype: str) -> float:
    """Share of elements within two ulps of the expected value rounded to dtype."""
    a = np.asarray(actual, np.float64)
    e = round_to(expected, dtype)
    with np.errstate(invalid="ignore"):  # an overflowed residual: inf - inf is NaN, but inf == inf
        return float(np.mean((a == e) | (np.abs(a - e) <= 2 * ulp_of(e, dtype) + 1e-300)))


def probe_norm_placement(trace: Trace, spec: GemmaSpec, layer: int, min_agreement: float = 0.98) -> Probe:
    """Pre-norm: attn_residual = in + attn and out = attn_residual + mlp, nothing in between."""
    p = f"layers.{layer}."
    x_in = trace.taps.get("embed" if layer == 0 else f"layers.{layer - 1}.out")
    t = {k: trace.taps.get(p + k) for k in ("attn", "post_attn_norm", "attn_residual", "mlp", "post_mlp_norm", "out")}
    tap = p + "attn_residual"
    if x_in is None or t["attn"] is None or t["attn_residual"] is None or t["mlp"] is None or t["out"] is None:
        return Probe("norm-placement", tap, "cannot tell: residual taps missing", None)
    dtype = trace.dtype
    x_in = np.asarray(x_in, np.float64)
    plain_attn = _close(t["attn_residual"], x_in + t["attn"], dtype)
    plain_mlp = _close(t["out"], np.asarray(t["attn_residual"], np.float64) + t["mlp"], dtype)
    ev = {"residual = in + attn": round(plain_attn, 4), "out = attn_residual + mlp": round(plain_mlp, 4)}
    post_attn = post_mlp = None
    if t["post_attn_norm"] is not None:
        post_attn = _close(t["attn_residual"], x_in + t["post_attn_norm"], dtype)
        ev["residual = in + post_attn_norm"] = round(post_attn, 4)
    if t["post_mlp_norm"] is not None:
        post_mlp = _close(t["out"], np.asarray(t["attn_residual"], np.float64) + t["post_mlp_norm"], dtype)
        ev["out = attn_residual + post_mlp_norm"] = round(post_mlp, 4)
    # direction test: is what was added to the residual a per-channel rescaled RMS-normalised attn?
    added = np.asarray(t["attn_residual"], np.float64) - x_in
    ev["added looks normalised"] = round(_looks_normalised(added, t["attn"]), 4)
    if (post_attn or 0) >= min_agreement and (post_mlp or 0) >= min_agreement:
        found = "sandwich"
    elif plain_attn >= min_agreement and plain_mlp >= min_agreement:
        found = "pre"
    else:
        found = "other"
    cause = None if found == spec.norm_placement else "norm-placement"
    if found == "other":
        hint = " (what reaches the residual is a normalised attention output: a post-attention norm)" \
            if ev["added looks normalised"] > 0.9 else ""
        return Probe("norm-placement", tap, f"neither pre-norm nor sandwich residuals hold{hint}", cause, ev)
    return Probe("norm-placement", tap, f"norm placement is {found} (spec says {spec.norm_placement})", cause, ev)


def _looks_normalised(added: np.ndarray, attn: np.ndarray) -> float:
    """R^2 of fitting `added` as a per-channel scale times the row-RMS-normalised attn."""
    a = np.asarray(attn, np.float64)
    n = a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + 1e-12)
    scale = (n * added).sum(0) / np.maximum((n * n).sum(0), 1e-30)  # [hidden]
    resid = added - n * scale
    tot = np.sum(added * added)
    return float(1.0 - np.sum(resid * resid) / tot) if tot > 0 else 1.0


# ------------------------------------------------------------------ RMSNorm
def rmsnorm_candidates(x: np.ndarray, w: np.ndarray, eps: float, dtype: str) -> dict[str, np.ndarray]:
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    c = {
        "(1 + w), multiply in fp32, cast after": normed * (1.0 + w),
        "w without the unit offset": normed * w,
    }
    if dtype in ("bfloat16", "float16"):
        c["(1 + w) rounded to " + dtype] = normed * round_to(1.0 + w, dtype)
        # Llama order: round the normalised activation first, multiply in low precision
        c["cast before multiply"] = round_to(normed, dtype) * round_to(1.0 + w, dtype)
    return c


NORM_CAUSES = {
    "(1 + w), multiply in fp32, cast after": None,
    "w without the unit offset": "norm-unit-offset-missing",
    "cast before multiply": "norm-cast-order",
}


def probe_rmsnorm(trace: Trace, spec: GemmaSpec, weights: dict, tap: str, x: np.ndarray, wname: str,
                  min_agreement: float = 0.95) -> Probe:
    y = trace.taps.get(tap)
    if y is None or x is None or wname not in weights:
        return Probe("norm", tap, "cannot tell: tap or its input missing", None)
    dtype = trace.dtype
    cands = rmsnorm_candidates(x, weights[wname], spec.norm_eps, dtype)
    # a norm weight near -1 makes (1 + w) ~ 0: its outputs can fall below the smallest normal (fp16: 6.1e-5)
    keep = trusted(dtype, y, *cands.values())
    scores = {k: agreement(y, v, dtype, keep) for k, v in cands.items()}
    correct = "(1 + w), multiply in fp32, cast after" if spec.norm_unit_offset else "w without the unit offset"
    best, score, lead = _pick(scores, correct)
    ev = {"agreement": {k: round(v, 4) for k, v in scores.items()}, "lead": round(lead, 4)}
    _trust(ev, keep, SUBNORMAL)
    if (few := _too_few("norm", tap, dtype, keep, SUBNORMAL, ev)) is not None:
        return few
    if score < min_agreement:
        return Probe("norm", tap, f"no RMSNorm candidate explains it (best {best!r} at {score:.1%})", "unexplained", ev)
    cause = NORM_CAUSES.get(best, "norm-unit-offset-lowp")
    if cause is not None and lead < 0.02:
        cause = None  # indistinguishable from the correct norm in this dtype
    return Probe("norm", tap, f"RMSNorm is {best}", cause, ev)


def probe_attn_norm(trace: Trace, spec: GemmaSpec, weights: dict, layer: int) -> Probe:
    x = trace.taps.get("embed" if layer == 0 else f"layers.{layer - 1}.out")
    return probe_rmsnorm(trace, spec, weights, f"layers.{layer}.attn_norm", x,
                         f"model.layers.{layer}.input_layernorm.weight")


def layer_norms(spec: GemmaSpec, layer: int) -> list[tuple[str, str, str]]:
    """Every RMSNorm of a layer but the first: (its tap, the tap that is its input, its canonical weight).

    Gemma 1 names its pre-MLP norm post_attention_layernorm; Gemma 2/3 use that name for the norm after
    attention and pre_feedforward_layernorm for the pre-MLP one.
    """
    p, w = f"layers.{layer}.", f"model.layers.{layer}."
    if spec.norm_placement != "sandwich":
        return [(p + "mlp_norm", p + "attn_residual", w + "post_attention_layernorm.weight")]
    return [(p + "post_attn_norm", p + "attn", w + "post_attention_layernorm.weight"),
            (p + "mlp_norm", p + "attn_residual", w + "pre_feedforward_layernorm.weight"),
            (p + "post_mlp_norm", p + "mlp", w + "post_feedforward_layernorm.weight")]


def probe_layer_norms(trace: Trace, spec: GemmaSpec, weights: dict, layer: int) -> list[Probe]:
    """Every RMSNorm probed the same way, so a cast order or offset fault is found wherever it happens."""
    return [probe_rmsnorm(trace, spec, weights, tap, trace.taps.get(src), wname)
            for tap, src, wname in layer_norms(spec, layer)]


def probe_final_norm(trace: Trace, spec: GemmaSpec, weights: dict) -> Probe:
    x = trace.taps.get(f"layers.{spec.num_layers - 1}.out")
    y = trace.taps.get("final_norm")
    if x is not None and y is not None and agreement(y, x, trace.dtype) > 0.99:
        return Probe("norm", "final_norm", "final_norm equals its input: the final RMSNorm is skipped",
                     "final-norm-missing", {"agreement with input": agreement(y, x, trace.dtype)})
    p = probe_rmsnorm(trace, spec, weights, "final_norm", x, "model.norm.weight")
    if p.cause == "unexplained" and spec.final_softcap and x is not None and "model.norm.weight" in weights:
        # the final softcap applied to the norm's output (and the tap taken after it)
        cap = spec.final_softcap
        normed = rmsnorm_candidates(x, weights["model.norm.weight"], spec.norm_eps, trace.dtype)
        capped = {k: np.tanh(v / cap) * cap for k, v in normed.items()}
        best = max(agreement(y, v, trace.dtype) for v in capped.values())
        p.evidence["agreement with softcap(norm)"] = round(best, 4)
        if best >= 0.95:
            return Probe("norm", "final_norm", f"final_norm is the RMSNorm's output soft-capped at {cap:g}: the final "
                         "softcap is applied to the norm, not to the logits", "softcap-misplaced", p.evidence)
    return p


# ------------------------------------------------------------------ embedding
def probe_embedding(trace: Trace, spec: GemmaSpec, weights: dict, min_agreement: float = 0.98) -> Probe:
    y = trace.taps.get("embed")
    if y is None or "model.embed_tokens.weight" not in weights:
        return Probe("embedding", "embed", "cannot tell: embed or the embedding weights missing", None)
    dtype = trace.dtype
    emb = "model.embed_tokens.weight"
    if hasattr(weights, "rows"):  # stored weights: read the prompt's rows, not a 256k-row table
        rows = np.asarray(weights.rows(emb, trace.tokens), np.float64)
    else:
        rows = np.asarray(weights[emb], np.float64)[np.asarray(trace.tokens)]
    rows = round_to(rows, dtype)
    root = math.sqrt(spec.hidden_size)
    cands = {
        f"x * sqrt(hidden) rounded to {dtype} ({round_to(np.array(root), dtype):.6g})": rows * round_to(np.array(root), dtype),
        f"x * sqrt(hidden) in fp32 ({root:.6g})": rows * root,
        "no scale": rows,
    }
    keep = trusted(dtype, y, *cands.values())  # tiny table entries: subnormal rows or products
    scores = {k: agreement(y, v, dtype, keep) for k, v in cands.items()}
    correct = next(iter(cands)) if spec.embed_scale else "no scale"
    best, score, lead = _pick(scores, correct)
    ev = {"agreement": {k: round(v, 4) for k, v in scores.items()}}
    _trust(ev, keep, SUBNORMAL)
    if (few := _too_few("embedding", "embed", dtype, keep, SUBNORMAL, ev)) is not None:
        return few
    if score < min_agreement:
        return Probe("embedding", "embed", f"no candidate explains the embedding (best {score:.1%})", "unexplained", ev)
    if best == "no scale":
        cause = "embed-scale-missing"
    elif "fp32" in best and lead > 0.02:
        cause = "embed-scale-dtype"
    else:
        cause = None
    return Probe("embedding", "embed", f"embedding is {best}", cause, ev)


# ------------------------------------------------------------------ all of them
class _WholeTaps(Mapping):
    """A trace's taps with the reduced ones left out: a probe needs every element or says "cannot tell"."""

    def __init__(self, taps: Mapping) -> None:
        self._taps = taps

    def __getitem__(self, name: str) -> np.ndarray:
        v = self._taps[name]
        if isinstance(v, ReducedTap):
            raise KeyError(name)
        return v

    def __iter__(self):
        return iter(self._taps)

    def __len__(self) -> int:
        return len(self._taps)


def run_probes(trace: Trace, spec: GemmaSpec, weights: dict, layers: list[int] | None = None) -> list[Probe]:
    layers = list(range(spec.num_layers)) if layers is None else layers
    trace = dataclasses.replace(trace, taps=_WholeTaps(trace.taps))
    calls = [(probe_embedding, (trace, spec, weights), "embed"), (probe_rope_precision, (trace, spec), "rope.cos")]
    for i in layers:
        calls += [(probe_attn_norm, (trace, spec, weights, i), f"layers.{i}.attn_norm"),
                  (probe_softmax, (trace, i), f"layers.{i}.attn.probs"),
                  (probe_attention_mask, (trace, spec, i), f"layers.{i}.attn.probs"),
                  (probe_norm_placement, (trace, spec, i), f"layers.{i}.attn_residual"),
                  (probe_layer_norms, (trace, spec, weights, i), f"layers.{i}.mlp_norm"),
                  (probe_gelu, (trace, i), f"layers.{i}.mlp.act"),
                  (probe_geglu, (trace, spec, i), f"layers.{i}.mlp.hidden")]
    calls += [(probe_final_norm, (trace, spec, weights), "final_norm"), (probe_lm_head, (trace, spec, weights), "logits")]
    out: list[Probe] = []
    for fn, args, tap in calls:
        try:
            got = fn(*args)
        except (ValueError, IndexError) as e:  # taps of the wrong shape (reported by the comparison as such)
            got = Probe(fn.__name__.removeprefix("probe_"), tap, f"cannot tell: the taps do not fit ({e})", None)
        out += got if isinstance(got, list) else [got]
    return out


# ------------------------------------------------------------------ attention mask and window
# The largest true probability that may read as exactly 0 in a probs tap of each dtype. fp16 keeps
# subnormals through the fp32 -> fp16 conversion (flush-to-zero is an fp32-arithmetic mode), so anything
# below its smallest subnormal, 2^-24 = 6e-8, may round to 0. bf16 and fp32 probabilities come from fp32
# arithmetic, which may flush below fp32's smallest normal, 2^-126.
UNDERFLOW = {k: FORMATS[k].smallest_subnormal if k == "float16" else FORMATS[k].smallest_normal for k in FORMATS}
# A zero reads as masked only when it would have to lie this many times further below the row's smallest
# visible probability than the row's own spread (max / min) reaches, to be an underflow.
SPREAD_MARGIN = 16.0


def _mask_geometry(T: int, want: int | None):
    i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    expected = (j <= i) if want is None else (j <= i) & (i - j < want)
    return i, j, expected


def _mask_verdict(tap: str, spec: GemmaSpec, layer: int, visible: np.ndarray, hidden: np.ndarray,
                  ev: dict) -> Probe | None:
    """The verdict of a mask that differs from the spec's, from the pairs proven visible and those proven
    masked (both [heads, T, T]); None when neither differs."""
    want = spec.window_for(layer)
    T = visible.shape[-1]
    i, j, expected = _mask_geometry(T, want)
    future = bool((visible & (j > i)[None]).any())
    span = int(np.max(np.where(visible, i - j + 1, 0), initial=0))  # widest look-back seen, the query included
    expected_span = min(want, T) if want else T
    wrong_visible = int(np.count_nonzero((visible & ~expected[None]).any(0)))
    wrong_hidden = int(np.count_nonzero((hidden & expected[None]).any(0)))
    ev.update({"tokens": T, "widest look-back": span, "expected": expected_span, "sees the future": future})
    if wrong_visible or wrong_hidden:
        ev.update({"visible pairs the spec masks": wrong_visible, "masked pairs the spec shows": wrong_hidden})
    what = f"window {want}" if want else "no window (global layer)"
    if future:
        return Probe("attention-mask", tap, "keys after the query are visible: the mask is not causal",
                     "sliding-window", ev)
    if span > expected_span or (wrong_hidden and span < expected_span):
        return Probe("attention-mask", tap, f"queries look back over {span} tokens, the spec says {what}",
                     "sliding-window", ev)
    if wrong_visible or wrong_hidden:
        return Probe("attention-mask", tap, f"the mask differs from the spec's ({what}) at "
                     f"{wrong_visible + wrong_hidden} query-key pairs", "sliding-window", ev)
    return None


def _row_rules_out_underflow(p: np.ndarray, shown: np.ndarray, dtype: str) -> np.ndarray:
    """[heads, T]: rows whose visible probabilities show that a zero in them is not an underflow.

    A zero in row (h, i) is read as masked only when (1) the row is spread, not
    concentrated on a sink: it has at least 3 nonzero probabilities and at least
    half of the keys the spec shows it (`shown`, [T]); and (2) its smallest nonzero
    probability p_min is far above UNDERFLOW[dtype] compared with the row's spread:
    p_min >= SPREAD_MARGIN * (p_max / p_min) * UNDERFLOW. A visible key reading 0 would
    then have to score below the row's lowest visible key by more than the row's whole
    range of scores (ln(p_max / p_min)) plus ln(SPREAD_MARGIN) nats. A sink row
    ([1, 0, ..., 0], or one key near 1 and the rest in the 1e-7 range) fails both:
    its zeros are what underflow looks like. Random weights spread the rows: in the
    port's fp16 rows on the tiny presets the median p_min is 2e-3 to 7e-3 and the
    median p_max / p_min 30 to 90, so p_min / UNDERFLOW (~5e4) is some 60 times the
    16 * (p_max / p_min) the rule asks for.
    """
    nz = p != 0
    n = nz.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmin = np.where(nz, p, np.inf).min(-1)
        pmax = np.where(nz, p, 0.0).max(-1)
        far = pmin * pmin >= SPREAD_MARGIN * UNDERFLOW[dtype] * pmax
    return (n >= np.maximum(3, np.ceil(shown / 2.0))[None]) & far


def probe_attention_mask(trace: Trace, spec: GemmaSpec, layer: int) -> Probe:
    """The mask and window this implementation applies, from evidence its dtype can carry.

    Where the scores are exposed with the mask added (`attn.scores`: masked keys
    are -inf, or a finite mask constant at half the dtype's most negative value),
    their pattern is the mask, whatever the probabilities underflow to.

    Otherwise the probabilities: a nonzero probability is always a visible key, so
    one for a key after the query proves a non-causal mask, and one further back
    than the window proves a too-wide window. A zero is not always a masked key: with
    an attention sink the other keys' probabilities fall below what the dtype holds
    (fp16: 6e-8) and read 0. A key the spec shows that reads 0 in every head is
    proven masked only when (a) at least half the heads' rows for that query rule out
    underflow (`_row_rules_out_underflow`), and (b) the same key reads nonzero for
    some other query (a key every head ignores everywhere, as a massive-activation
    BOS scoring far below can be, is content, not mask). Zeros with no such proof
    give "cannot tell" when they are what makes the look-back short; and a local
    layer's window is confirmed only when some key just beyond it is proven masked
    (a wider window whose extra keys underflowed would otherwise read the same).
    """
    tap = f"layers.{layer}.attn.probs"
    dtype = trace.dtype
    want = spec.window_for(layer)
    scores = trace.taps.get(f"layers.{layer}.attn.scores")
    if isinstance(scores, ReducedTap):
        scores = None
    if scores is not None:
        s = np.asarray(scores, np.float64)
        T = s.shape[-1]
        s = s.reshape(-1, T, T)
        floor = 0.5 * float(np.finfo(np.float32).min if dtype == "bfloat16" else np.finfo(np_dtype(dtype)).min)
        hidden = np.isneginf(s) | (np.isfinite(s) & (s <= floor))
        # scores with nothing masked are the logits before the mask (or a model without one): the
        # probabilities decide then
        if hidden.any() or T < 2:
            visible = np.isfinite(s) & ~hidden
            ev = {"read from": "scores (-inf pattern)"}
            bad = _mask_verdict(tap, spec, layer, visible, hidden, ev)
            return bad or _mask_ok(tap, want, T, ev)
    probs = trace.taps.get(tap)
    if probs is None or isinstance(probs, ReducedTap):
        return Probe("attention-mask", tap, "cannot tell: attention probabilities not exposed", None)
    p = np.asarray(probs, np.float64)
    T = p.shape[-1]
    p = p.reshape(-1, T, T)
    visible = np.isfinite(p) & (p != 0)
    i, j, expected = _mask_geometry(T, want)
    zero = ~visible.any(0)  # [T, T]: 0 in every head (a mask is the same for every head)
    decisive = _row_rules_out_underflow(np.where(np.isfinite(p), p, 0.0), expected.sum(-1), dtype)  # [H, T]
    # a zero is proven masked when half the heads' rows for its query rule out underflow, and its key
    # reads nonzero for some other query
    provable = zero & (decisive.mean(0) >= 0.5)[:, None] & visible.any((0, 1))[None, :]
    unproven = expected & zero & ~provable  # keys the spec shows that read 0, maybe by underflow
    ev = {"read from": "probabilities"}
    if (expected & zero).any():
        ev.update({"pairs the spec shows at 0 in every head": int((expected & zero).sum()),
                   "of them proven masked": int((expected & provable).sum())})
    bad = _mask_verdict(tap, spec, layer, visible, np.broadcast_to(provable, visible.shape), ev)
    if bad is not None:
        return bad
    why = f"in rows concentrated enough (an attention sink) that {dtype} underflow explains the zeros"
    if ev["widest look-back"] < ev["expected"]:
        return Probe("attention-mask", tap, f"cannot tell: queries look back over {ev['widest look-back']} tokens "
                     f"where the spec says {ev['expected']}, but the keys further back read 0 {why}; the scores "
                     "(not exposed) would settle it", None, ev)
    if want is not None and T > want:
        # the window's far edge: some key just beyond it must be provably masked, or a wider window whose
        # extra keys underflowed would read the same
        edge = (i - j == want) & provable
        ev["masked just beyond the window"] = int(edge.sum())
        if not edge.any():
            return Probe("attention-mask", tap, f"cannot tell: queries look back over {want} tokens as the spec "
                         f"says, but no key just beyond the window is provably masked ({why})", None, ev)
    return _mask_ok(tap, want, T, ev, int(unproven.sum()))


def _mask_ok(tap: str, want: int | None, T: int, ev: dict, unproven: int = 0) -> Probe:
    kind = f"local, window {want}" if want else "global, causal"
    note = "" if T > (want or 0) else f" (prompt of {T} tokens is too short to see the window)"
    if unproven:
        note += f" ({unproven} zero probabilities where the spec shows the key are read as underflow, not mask)"
    return Probe("attention-mask", tap, f"mask is {kind}{note}", None, ev)


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
        return Probe("lm-head", "logits", "cannot tell: final_norm or logits not captured", None)
    dtype = trace.dtype
    head = round_to(weights.get("lm_head.weight", weights["model.embed_tokens.weight"]), dtype)
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    raw = x64 @ head.T  # [T, vocab]
    cap = spec.final_softcap
    cands = {"tied head, no softcap": raw}
    if cap:
        cands[f"tied head, softcap {cap:g}"] = np.tanh(raw / cap) * cap
        cands[f"softcap {cap:g} on final_norm, then tied head"] = (np.tanh(x64 / cap) * cap) @ head.T
    expected = f"tied head, softcap {cap:g}" if cap else "tied head, no softcap"
    # a matmul in low precision accumulates differently: judge by closeness, not bits
    scale = np.sqrt(np.mean(y64**2)) or 1.0
    tol = LM_HEAD_CLOSENESS[dtype]

    def close(v) -> float:
        return float(np.mean(np.abs(y64 - v) <= tol * scale))

    scores = {k: close(v) for k, v in cands.items()}
    best, score, _ = _pick(scores, expected)
    ev = {"agreement": {k: round(v, 4) for k, v in scores.items()}}
    if score >= min_agreement:
        if best == expected:
            return Probe("lm-head", "logits", f"logits are {best}", None, ev)
        if best.startswith("softcap"):
            return Probe("lm-head", "logits", f"logits are {best}: the final softcap caps the final norm's output, "
                         "not the logits", "softcap-misplaced", ev)
        return Probe("lm-head", "logits", f"logits are {best}, the spec has a final softcap", "final-softcap-missing", ev)
    want = cands[expected]
    shift = np.mean(y64 - want, axis=-1, keepdims=True)  # [T, 1]: one constant per position
    ev["agreement with the per-position shift removed"] = round(close(want + shift), 4)
    if close(want + shift) >= min_agreement:
        ev["largest shift"] = float(np.max(np.abs(shift)))
        return Probe("lm-head", "logits", "logits are the correct ones shifted by a constant per position (a centred "
                     "unembedding): the next-token distribution is the same", "logit-shift", ev)
    if head.size <= 5e7:  # the span test solves a [vocab, hidden] least squares: skipped at real vocabularies
        z, *_ = np.linalg.lstsq(head, y64.T, rcond=None)  # [hidden, T]
        resid = float(np.linalg.norm(head @ z - y64.T) / (np.linalg.norm(y64) or 1.0))
        ev["share of the logits outside the embedding's span"] = round(resid, 4)
        if resid < 10 * tol:
            return Probe("lm-head", "logits", "logits lie in the span of the embedding (a tied head) but are not "
                         "final_norm times it: the head's input is not the captured final_norm", "unexplained", ev)
    return Probe("lm-head", "logits", "logits are not final_norm times the embedding, nor in its span: the head is "
                 "not tied to the embedding", "lm-head-untied", ev)


# ------------------------------------------------------------------ rotary table precision
def probe_rope_precision(trace: Trace, spec: GemmaSpec, min_agreement: float = 0.98) -> Probe:
    """Which arithmetic produced layer 0's cos table: fp32 angles, a rounded inv_freq, or low-precision angles."""
    cos = trace.taps.get("rope.cos")
    if cos is None:
        return Probe("rope-precision", "rope.cos", "cannot tell: the rotary table is not exposed", None)
    dtype = trace.dtype
    if dtype == "float64":
        return Probe("rope-precision", "rope.cos", "float64 run: nothing to round", None)
    T, hd = cos.shape
    base, factor = spec.rope_base_for(0), spec.rope_factor_for(0)
    f32 = np.float32
    idx = np.arange(0, hd, 2, dtype=np.int64).astype(f32)
    inv32 = (f32(1.0) / (f32(base) ** (idx / f32(hd)))).astype(f32)  # [hd / 2], as HF computes it
    pos32 = (np.arange(T).astype(f32) / f32(factor)).astype(f32)

    def table(inv, pos, t=np.float32):
        ang = (pos.astype(t)[:, None] * inv.astype(t)[None, :]).astype(t)  # [T, hd / 2]
        return np.cos(np.concatenate([ang, ang], axis=-1).astype(np.float64))

    cands = {"fp32 angles, cos rounded once": table(inv32, pos32)}
    if dtype in ("bfloat16", "float16"):
        low = np_dtype(dtype)
        cands[f"inv_freq rounded to {dtype}"] = table(round_to(inv32, dtype).astype(f32), pos32)
        cands[f"angles in {dtype}"] = table(inv32.astype(low), pos32.astype(low), low)
    # the table does not depend on the weights and cos has no cancellation; only a cos within a subnormal
    # of zero is left out, as everywhere
    keep = trusted(dtype, cos, *cands.values())
    scores = {k: agreement(cos, v, dtype, keep) for k, v in cands.items()}
    best, score, lead = _pick(scores, "fp32 angles, cos rounded once")
    ev = {"agreement": {k: round(v, 4) for k, v in scores.items()}, "positions": T}
    _trust(ev, keep, SUBNORMAL)
    if (few := _too_few("rope-precision", "rope.cos", dtype, keep, SUBNORMAL, ev)) is not None:
        return few
    if score < min_agreement:
        return Probe("rope-precision", "rope.cos", f"no candidate explains the cos table (best {score:.1%})",
                     "unexplained", ev)
    cause = None if best.startswith("fp32") or lead < 0.01 else "rope-precision"
    return Probe("rope-precision", "rope.cos", f"rotary table from {best}", cause, ev)


# ------------------------------------------------------------------ softmax precision
def probe_softmax(trace: Trace, layer: int, min_agreement: float = 0.98) -> Probe:
    """Softmax of the implementation's own scores: in fp32 rounded once, or op by op in the dtype."""
    tap = f"layers.{layer}.attn.probs"
    scores, probs = trace.taps.get(f"layers.{layer}.attn.scores"), trace.taps.get(tap)
    if scores is None or probs is None:
        return Probe("softmax", tap, "cannot tell: attention scores not exposed", None)
    dtype = trace.dtype
    s = np.asarray(scores, np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    cands = {"fp32, rounded once": e / e.sum(-1, keepdims=True)}
    if dtype in ("bfloat16", "float16"):
        el = round_to(np.exp(round_to(s - s.max(-1, keepdims=True), dtype)), dtype)
        cands[f"op by op in {dtype}"] = el / round_to(el.sum(-1, keepdims=True), dtype)
    # an attention sink leaves the other keys' probabilities tiny: in fp16 many are subnormal (below 6.1e-5),
    # where flush-to-zero and lost bits decide, not the softmax's order; masked keys (exact 0 in every
    # candidate) stay in
    keep = trusted(dtype, probs, *cands.values())
    scores_ = {k: agreement(probs, v, dtype, keep) for k, v in cands.items()}
    best, score, lead = _pick(scores_, "fp32, rounded once")
    ev = {"agreement": {k: round(v, 4) for k, v in scores_.items()}}
    _trust(ev, keep, SUBNORMAL)
    if (few := _too_few("softmax", tap, dtype, keep, SUBNORMAL, ev)) is not None:
        return few
    if score < min_agreement:
        return Probe("softmax", tap, f"no softmax candidate explains the probabilities (best {score:.1%})",
                     "unexplained", ev)
    cause = None if best.startswith("fp32") or lead < 0.01 else "softmax-precision"
    return Probe("softmax", tap, f"softmax {best}", cause, ev)
