"""The norms' probes: every RMSNorm's formula (unit offset, cast order), the final norm, and where the
norms sit around the residual stream (pre-norm or sandwich)."""

from __future__ import annotations

import dataclasses

import numpy as np

from parity.capture.trace import Trace
from parity.diagnose.probes._evidence import SUBNORMAL, Candidate, Probe, agreement, decide, trusted
from parity.diagnose.probes._registry import ProbeSpec, register
from parity.model.spec import GemmaSpec
from parity.numerics.metrics import round_to, ulp_of


# ------------------------------------------------------------------ residual structure
def _close(actual: np.ndarray, expected: np.ndarray, dtype: str) -> float:
    """Share of elements within two ulps of the expected value rounded to dtype."""
    a = np.asarray(actual, np.float64)
    e = round_to(expected, dtype)
    with np.errstate(invalid="ignore"):  # an overflowed residual: inf - inf is NaN, but inf == inf
        return float(np.mean((a == e) | (np.abs(a - e) <= 2 * ulp_of(e, dtype) + 1e-300)))


def probe_norm_placement(trace: Trace, spec: GemmaSpec, layer: int, min_agreement: float = 0.98,
                         weights: dict | None = None) -> Probe:
    """Pre-norm: attn_residual = in + attn and out = attn_residual + mlp, nothing in between."""
    p = f"layers.{layer}."
    x_in = trace.taps.get("embed" if layer == 0 else f"layers.{layer - 1}.out")
    t = {k: trace.taps.get(p + k) for k in ("attn", "post_attn_norm", "attn_residual", "mlp", "post_mlp_norm", "out")}
    tap = p + "attn_residual"
    if x_in is None or t["attn"] is None or t["attn_residual"] is None or t["mlp"] is None or t["out"] is None:
        return Probe.cannot_tell("norm-placement", tap, "residual taps missing")
    dtype = trace.dtype
    x_in = np.asarray(x_in, np.float64)
    # Gemma 4: the block output is (residual + PLE branch) times the layer scalar; compare before both
    if trace.taps.get(p + "pre_scalar") is not None:
        t["out"] = trace.taps[p + "pre_scalar"]
    ple = trace.taps.get(p + "ple")

    def then_ple(mid: np.ndarray) -> np.ndarray:  # the residual after the MLP, rounded, plus the PLE branch
        return mid if ple is None else round_to(mid, dtype) + np.asarray(ple, np.float64)

    plain_attn = _close(t["attn_residual"], x_in + t["attn"], dtype)
    plain_mlp = _close(t["out"], then_ple(np.asarray(t["attn_residual"], np.float64) + t["mlp"]), dtype)
    ev = {"residual = in + attn": round(plain_attn, 4), "out = attn_residual + mlp": round(plain_mlp, 4)}
    post_attn = post_mlp = None
    if t["post_attn_norm"] is not None:
        post_attn = _close(t["attn_residual"], x_in + t["post_attn_norm"], dtype)
        ev["residual = in + post_attn_norm"] = round(post_attn, 4)
    if t["post_mlp_norm"] is not None:
        post_mlp = _close(t["out"], then_ple(np.asarray(t["attn_residual"], np.float64) + t["post_mlp_norm"]), dtype)
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
    if found == "other" and ple is not None and t["post_attn_norm"] is not None:
        # Gemma 4: the PLE branch added after attention, before the MLP (it then reaches the MLP's input)
        early = _close(t["attn_residual"], round_to(x_in + t["post_attn_norm"], dtype) + np.asarray(ple, np.float64),
                       dtype)
        ev["residual = in + post_attn_norm + ple"] = round(early, 4)
        if early >= min_agreement:
            return Probe.named("norm-placement", tap, "the PLE branch is added to the residual after attention, "
                               "before the MLP: misplaced", cause="ple-placement", evidence=ev)
    scalar = (weights or {}).get(f"model.layers.{layer}.layer_scalar")
    if found == "other" and scalar is not None and t["post_attn_norm"] is not None:
        # Gemma 4: the layer scalar applied to the residual entering the block, not to the block's output
        scaled = _close(t["attn_residual"], round_to(x_in * float(np.asarray(scalar).ravel()[0]), dtype)
                        + np.asarray(t["post_attn_norm"], np.float64), dtype)
        ev["residual = scalar * in + post_attn_norm"] = round(scaled, 4)
        if scaled >= min_agreement:
            return Probe.named("norm-placement", tap, "the residual entering the block is multiplied by the layer "
                               "scalar before attention is added: the scalar is misplaced",
                               cause="layer-scalar-misplaced", evidence=ev)
    if found == "other":
        hint = " (what reaches the residual is a normalised attention output: a post-attention norm)" \
            if ev["added looks normalised"] > 0.9 else ""
        return Probe.of("norm-placement", tap, f"neither pre-norm nor sandwich residuals hold{hint}", cause=cause,
                        evidence=ev)
    return Probe.of("norm-placement", tap, f"norm placement is {found} (spec says {spec.norm_placement})",
                    cause=cause, evidence=ev)


def _looks_normalised(added: np.ndarray, attn: np.ndarray) -> float:
    """R^2 of fitting `added` as a per-channel scale times the row-RMS-normalised attn."""
    a = np.asarray(attn, np.float64)
    n = a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + 1e-12)
    scale = (n * added).sum(0) / np.maximum((n * n).sum(0), 1e-30)  # [hidden]
    resid = added - n * scale
    tot = np.sum(added * added)
    return float(1.0 - np.sum(resid * resid) / tot) if tot > 0 else 1.0


# ------------------------------------------------------------------ RMSNorm
NORM_TIE = 0.02  # a wrong norm leading the runner-up by less is indistinguishable from the correct one in this dtype
GEMMA_NORM = "(1 + w), multiply in fp32, cast after"
NO_OFFSET = "w without the unit offset"


def rmsnorm_candidates(x: np.ndarray, w: np.ndarray, eps: float, dtype: str,
                       unit_offset: bool = True) -> list[Candidate]:
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    if not unit_offset:  # Gemma 4 multiplies by w as is: a (1 + w) there is left unexplained until it has a cause
        c = [Candidate(NO_OFFSET, None, normed * w)]
        if dtype in ("bfloat16", "float16"):
            c.append(Candidate("cast before multiply", "norm-cast-order", round_to(normed, dtype) * round_to(w, dtype),
                               NORM_TIE))
        return c
    c = [Candidate(GEMMA_NORM, None, normed * (1.0 + w)),
         Candidate(NO_OFFSET, "norm-unit-offset-missing", normed * w, NORM_TIE)]
    if dtype in ("bfloat16", "float16"):
        c.append(Candidate("(1 + w) rounded to " + dtype, "norm-unit-offset-lowp",
                           normed * round_to(1.0 + w, dtype), NORM_TIE))
        # Llama order: round the normalised activation first, multiply in low precision
        c.append(Candidate("cast before multiply", "norm-cast-order",
                           round_to(normed, dtype) * round_to(1.0 + w, dtype), NORM_TIE))
    return c


def probe_rmsnorm(trace: Trace, spec: GemmaSpec, weights: dict, tap: str, x: np.ndarray, wname: str,
                  min_agreement: float = 0.95) -> Probe:
    y = trace.taps.get(tap)
    if y is None or x is None or wname not in weights:
        return Probe.cannot_tell("norm", tap, "tap or its input missing")
    dtype = trace.dtype
    cands = rmsnorm_candidates(x, weights[wname], spec.norm_eps, dtype, spec.norm_unit_offset)
    # a norm weight near -1 makes (1 + w) ~ 0: its outputs can fall below the smallest normal (fp16: 6.1e-5)
    keep = trusted(dtype, y, *(c.values for c in cands))
    correct = next(c for c in cands if c.label == (GEMMA_NORM if spec.norm_unit_offset else NO_OFFSET))
    return decide("norm", tap, y, cands, dtype, keep, SUBNORMAL, min_agreement, correct=correct,
                  lead_as=lambda v: round(v, 4), says="RMSNorm is {best}",
                  unexplained="no RMSNorm candidate explains it (best {best!r} at {score:.1%})")


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
        return Probe.named("norm", "final_norm", "final_norm equals its input: the final RMSNorm is skipped",
                           cause="final-norm-missing",
                           evidence={"agreement with input": agreement(y, x, trace.dtype)})
    p = probe_rmsnorm(trace, spec, weights, "final_norm", x, "model.norm.weight")
    if p.cause == "unexplained" and spec.final_softcap and x is not None and "model.norm.weight" in weights:
        # the final softcap applied to the norm's output (and the tap taken after it)
        cap = spec.final_softcap
        normed = rmsnorm_candidates(x, weights["model.norm.weight"], spec.norm_eps, trace.dtype, spec.norm_unit_offset)
        capped = [np.tanh(c.values / cap) * cap for c in normed]
        best = max(agreement(y, v, trace.dtype) for v in capped)
        p = dataclasses.replace(p, evidence={**p.evidence, "agreement with softcap(norm)": round(best, 4)})
        if best >= 0.95:
            return Probe.named("norm", "final_norm", f"final_norm is the RMSNorm's output soft-capped at {cap:g}: "
                               "the final softcap is applied to the norm, not to the logits", cause="softcap-misplaced",
                               evidence=p.evidence)
    return p


NORM_CAUSES = ("norm-unit-offset-missing", "norm-unit-offset-lowp", "norm-cast-order", "unexplained")
register(ProbeSpec("attn_norm", lambda trace, spec, weights, layer: probe_attn_norm(trace, spec, weights, layer),
                   "layers.{}.attn_norm", per_layer=True, causes=NORM_CAUSES))
register(ProbeSpec("norm_placement",
                   lambda trace, spec, weights, layer: probe_norm_placement(trace, spec, layer, weights=weights),
                   "layers.{}.attn_residual", per_layer=True, causes=("norm-placement", "layer-scalar-misplaced", "ple-placement")))
register(ProbeSpec("layer_norms", probe_layer_norms, "layers.{}.mlp_norm", per_layer=True, causes=NORM_CAUSES))
register(ProbeSpec("final_norm", probe_final_norm, "final_norm", per_layer=False,
                   causes=NORM_CAUSES + ("final-norm-missing", "softcap-misplaced")))
