"""The MLP's probes: which GELU maps mlp.gate to mlp.act, and whether mlp.hidden is act * up."""

from __future__ import annotations

import dataclasses

import math

import numpy as np

from parity.capture.trace import Trace
from parity.diagnose.probes._evidence import (SUBNORMAL, UNIT_ROUNDOFF, Candidate, Probe, agreement, decide,
                                              trusted)
from parity.diagnose.probes._registry import ProbeSpec, register
from parity.model.spec import GemmaSpec
from parity.numerics.metrics import np_dtype


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


def gelu_fp16_table(x: np.ndarray) -> np.ndarray:
    """ggml's CPU GELU (GGML_GELU_FP16, on by default): the input rounded to float16 indexes a table of
    tanh-GELU values stored in float16; at or below -10 it is 0, at or above 10 the input itself. In float32 runs
    too, so its error is float16's (about 5e-4 relative per element), not float32's."""
    x = np.asarray(x, np.float64)
    idx = x.astype(np.float32).astype(np.float16).astype(np.float64)  # GGML_CPU_FP32_TO_FP16(x)
    table = gelu_tanh(idx).astype(np.float32).astype(np.float16).astype(np.float64)  # ggml_table_gelu_f16[t]
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, table))


GELU_TIE = 1e-3  # within a dtype, exact and tanh can tie when every input is tiny: say so instead of guessing
CORRECT_GELU = "tanh, rounded once"


def gelu_candidates(x: np.ndarray, dtype: str, approximate: str = "tanh") -> list[Candidate]:
    """The GELUs an implementation may compute, the spec's first (`approximate`: GemmaSpec.gelu_approximate,
    "tanh" as every released Gemma, or "none" for a spec that asks for the exact erf form). The other form
    is the divergence: `gelu-exact` where tanh is asked for, `gelu-tanh` where exact is."""
    x = np.asarray(x, dtype=np.float64)
    tanh_ = Candidate(CORRECT_GELU, None, gelu_tanh(x), GELU_TIE)
    exact = Candidate("exact, rounded once", "gelu-exact", gelu_exact(x), GELU_TIE)
    if approximate != "tanh":
        return [dataclasses.replace(exact, cause=None), dataclasses.replace(tanh_, cause="gelu-tanh")]
    c = [tanh_, exact]
    if dtype in ("bfloat16", "float16"):
        c.append(Candidate("tanh, op by op in " + dtype, "act-lowp", gelu_tanh_op_by_op(x, dtype), GELU_TIE))
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


def gelu_trusted(x: np.ndarray, dtype: str, cands: list[Candidate], actual: np.ndarray) -> np.ndarray:
    """Elements where GELU's candidates can be held to the implementation's output in `dtype`."""
    from scipy.special import erfc, expit

    keep = trusted(dtype, actual, *(c.values for c in cands))
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


def probe_gelu(trace: Trace, layer: int, min_agreement: float = 0.98, approximate: str = "tanh") -> Probe:
    """Which GELU maps this implementation's own mlp.gate to its own mlp.act.

    Decided on the elements the dtype can be trusted with (`gelu_trusted`): where
    the gate is so negative that 1 + tanh cancels, even the right formula misses
    bit-for-bit agreement, so those elements are left out and counted in the evidence.
    """
    tap = f"layers.{layer}.mlp.act"
    x, y = trace.taps.get(f"layers.{layer}.mlp.gate"), trace.taps.get(tap)
    if x is None or y is None:
        return Probe.cannot_tell("gelu", tap, "mlp.gate or mlp.act not captured")
    dtype = trace.dtype
    cands = gelu_candidates(x, dtype, approximate)
    keep = gelu_trusted(x, dtype, cands, y)
    also = []
    # the same candidates applied to the up projection tell a swapped GeGLU apart
    up = trace.taps.get(f"layers.{layer}.mlp.up")
    if up is not None and up.shape == x.shape:
        up_cands = gelu_candidates(up, dtype, approximate)
        up_keep = gelu_trusted(up, dtype, up_cands, y)
        also.append((Candidate("gelu applied to mlp.up", "geglu-swapped"),
                     max(agreement(y, c.values, dtype, up_keep) for c in up_cands)))
    return decide("gelu", tap, y, cands, dtype, keep, _gelu_why(dtype), min_agreement, correct=cands[0],
                  also=also, lead_as=float, with_finding=True, says="GELU is {best}",
                  tied="{best} and the runner-up agree equally ({score:.1%}): inputs too small to tell",
                  unexplained="no GELU candidate explains mlp.act (best {best!r} at {score:.1%})")


# ------------------------------------------------------------------ GeGLU
def probe_geglu(trace: Trace, spec: GemmaSpec, layer: int, min_agreement: float = 0.98) -> Probe:
    """Widths of both projections, and whether mlp.hidden is act * up."""
    p = f"layers.{layer}.mlp."
    gate, up, act, hidden = (trace.taps.get(p + k) for k in ("gate", "up", "act", "hidden"))
    tap = p + "hidden"
    if any(v is None for v in (gate, up, act, hidden)):
        return Probe.cannot_tell("geglu", tap, "an MLP tap is missing")
    widths = {"gate": int(gate.shape[-1]), "up": int(up.shape[-1]), "hidden": int(hidden.shape[-1]),
              "spec intermediate_size": spec.mlp_width_for(layer)}  # Gemma 4: doubled on KV-shared layers
    if len({widths["gate"], widths["up"], widths["hidden"], spec.mlp_width_for(layer)}) != 1:
        # the widths are read at the projections: the first tap they change is the gate's
        return Probe.named("geglu", p + "gate", f"projection widths {widths} do not all equal intermediate_size",
                           cause="geglu-width", evidence={"widths": widths})
    dtype = trace.dtype
    # act * up of two dtype values is exact in fp32 and rounded once, so every product the dtype holds as
    # a normal number is a fair test; a subnormal product (a tiny GELU output times a small up) is not
    cands = [Candidate("act * up", None, np.asarray(act, np.float64) * up),
             Candidate("act * gate", "geglu-swapped", np.asarray(act, np.float64) * gate)]
    keep = trusted(dtype, hidden, *(c.values for c in cands))
    return decide("geglu", tap, hidden, cands, dtype, keep, SUBNORMAL, min_agreement, correct=cands[0],
                  extra={"widths": widths}, says="mlp.hidden = {best}",
                  unexplained="mlp.hidden is neither act * up nor act * gate (best {score:.1%})")


def probe_geglu_fused(trace: Trace, spec: GemmaSpec, layer: int, min_agreement: float = 0.98) -> Probe:
    """Where mlp.act is not captured (one fused GeGLU kernel: llama.cpp's ggml_geglu_split, mlx-lm's compiled
    function), which GELU of which projection, times the other, gives mlp.hidden."""
    p = f"layers.{layer}.mlp."
    tap = p + "hidden"
    if trace.taps.get(p + "act") is not None:
        return Probe.cannot_tell("geglu-fused", tap, "mlp.act is captured: the gelu and geglu probes decide")
    gate, up, hidden = (trace.taps.get(p + k) for k in ("gate", "up", "hidden"))
    if any(v is None for v in (gate, up, hidden)):
        return Probe.cannot_tell("geglu-fused", tap, "mlp.gate, mlp.up or mlp.hidden not captured")
    if not (gate.shape == up.shape == hidden.shape):
        return Probe.cannot_tell("geglu-fused", tap, f"shapes differ: gate {gate.shape}, up {up.shape}, "
                                 f"hidden {hidden.shape}")
    dtype = trace.dtype
    g, u = np.asarray(gate, np.float64), np.asarray(up, np.float64)
    exact_spec = spec.gelu_approximate != "tanh"
    cands = [Candidate(f"gelu(gate) {CORRECT_GELU} * up", "gelu-tanh" if exact_spec else None, gelu_tanh(g) * u,
                       GELU_TIE),
             Candidate("exact gelu(gate) * up", None if exact_spec else "gelu-exact", gelu_exact(g) * u, GELU_TIE),
             # ggml's table holds the tanh form: against an exact spec it is that formula first
             Candidate("gelu(gate) from a float16 table * up", "gelu-tanh" if exact_spec else "gelu-fp16-table",
                       gelu_fp16_table(g) * u, GELU_TIE),
             Candidate("gelu(up) * gate", "geglu-swapped", (gelu_exact(u) if exact_spec else gelu_tanh(u)) * g)]
    if exact_spec:  # the spec's form first: it is the correct candidate
        cands = [cands[1], cands[0], *cands[2:]]
    if dtype in ("bfloat16", "float16") and not exact_spec:
        cands.append(Candidate(f"gelu(gate) op by op in {dtype} * up", "act-lowp", gelu_tanh_op_by_op(g, dtype) * u,
                               GELU_TIE))
    keep = gelu_trusted(g, dtype, cands, hidden)
    return decide("geglu-fused", tap, hidden, cands, dtype, keep, _gelu_why(dtype), min_agreement,
                  correct=cands[0], lead_as=float, with_finding=True, says="mlp.hidden = {best}",
                  tied="{best} and the runner-up agree equally ({score:.1%}): inputs too small to tell",
                  unexplained="no GeGLU candidate explains mlp.hidden (best {best!r} at {score:.1%})")


register(ProbeSpec("gelu", lambda trace, spec, weights, layer: probe_gelu(trace, layer,
                                                                        approximate=spec.gelu_approximate),
                   "layers.{}.mlp.act", per_layer=True,
                   causes=("gelu-exact", "gelu-tanh", "act-lowp", "geglu-swapped", "unexplained")))
register(ProbeSpec("geglu", lambda trace, spec, weights, layer: probe_geglu(trace, spec, layer),
                   "layers.{}.mlp.hidden", per_layer=True, causes=("geglu-width", "geglu-swapped", "unexplained")))
register(ProbeSpec("geglu-fused", lambda trace, spec, weights, layer: probe_geglu_fused(trace, spec, layer),
                   "layers.{}.mlp.hidden", per_layer=True,
                   causes=("gelu-exact", "gelu-tanh", "gelu-fp16-table", "geglu-swapped", "act-lowp",
                           "unexplained")))
