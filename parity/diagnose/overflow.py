"""`fp16-overflow`: a float16 run whose first divergence is an activation past float16's range.

A float16 tap that holds inf or NaN, or values at +-65504 (a runtime that clips its residual adds saturates
there instead), where the reference's values at the same tap exceed 65504 in magnitude: the correct
computation does not fit float16. Named with the tap and the reference's largest magnitude, before any
counterfactual is tried (no formula change explains a range).
"""

from __future__ import annotations

import numpy as np

FP16_MAX = 65504.0


def overflow(report, impl: str, dtype: str, first) -> str | None:
    """The evidence sentence when `first` (a failing TapResult of a float16 run) is float16 overflow, else None."""
    if dtype != "float16":
        return None
    ref_name, ref_dtype = report.reference.split("@")
    try:
        mine = report.trace(impl, dtype, first.prompt, "cumulative")
        ref = report.trace(ref_name, ref_dtype, first.prompt, "cumulative")
    except KeyError:
        return None
    if first.tap not in mine.taps or first.tap not in ref.taps:
        return None
    return overflow_of(mine.taps[first.tap], ref.taps[first.tap], first.tap)


def overflow_of(a, r, tap: str) -> str | None:
    """The evidence sentence when the float16 values `a` at `tap` overflow where the reference's `r` exceed
    float16's range (the prefill's trace, or one decode step's row), else None."""
    if not isinstance(a, np.ndarray) or not isinstance(r, np.ndarray):
        return None  # a reduced tap (real sizes) keeps no elements to look at
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    ref_max = float(np.max(np.abs(r[np.isfinite(r)]))) if np.isfinite(r).any() else float("inf")
    if not ref_max > FP16_MAX:
        return None  # the reference fits float16: an inf here is the implementation's own doing
    bad = ~np.isfinite(a)
    saturated = np.isfinite(a) & (np.abs(a) >= FP16_MAX)
    if not bad.any() and not saturated.any():
        return None
    what = (f"{int(bad.sum())} element(s) infinite or NaN" if bad.any() else "") + \
        (", " if bad.any() and saturated.any() else "") + \
        (f"{int(saturated.sum())} element(s) clipped at +-{FP16_MAX:g}" if saturated.any() else "")
    return (f"first divergence at {tap}: {what} in float16, where the reference's largest magnitude there is "
            f"{ref_max:.6g}, past float16's largest finite value {FP16_MAX:g}: the activations overflow float16 "
            "(run in bfloat16 or float32, or scale the residual stream down)")
