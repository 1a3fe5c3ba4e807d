"""Error metrics between an implementation's tap and the reference's, in float64.

No framework here: arrays in, numbers out.
"""

from __future__ import annotations

import math

import numpy as np

from parity.numerics.tolerances import FORMATS

# explicit mantissa bits (without the implicit one) and smallest normal exponent
_FORMATS = {k: (f.mantissa_bits, f.min_exponent) for k, f in FORMATS.items()}


def ulp_of(x: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of `dtype` at |x| (subnormal spacing below the smallest normal)."""
    bits, emin = _FORMATS[dtype]
    ax = np.abs(x)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(ax > 0, ax, 1.0)))
    e = np.maximum(e, emin)
    return np.ldexp(1.0, (e - bits).astype(np.int64))


def rms(x: np.ndarray) -> float:
    """Root mean square over the finite elements (masked attention scores hold -inf)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def row_norms(ref: np.ndarray) -> np.ndarray:
    """Each row's RMS over its finite values, shaped to broadcast against `ref`.

    A row is one index of the first axis, as everywhere in a trace (a token of a
    [T, hidden] tap, a head of [heads, T, T] attention, a reduced tap's rows).
    Per row, not per tap: one massive activation (a BOS channel hundreds of
    times the rest) inflates a whole-tap RMS and with it every other token's
    bound. A row with no finite non-zero value falls back to the tap's RMS (and
    1 if that is zero), so a bound is never zero by accident.
    """
    b = np.asarray(ref, dtype=np.float64)
    if b.ndim < 2:
        return np.full((1,) * max(b.ndim, 1), rms(b) or 1.0)
    rows = b.reshape(b.shape[0], -1)
    fin = np.isfinite(rows)
    n = np.maximum(fin.sum(axis=1), 1)
    r = np.sqrt((np.where(fin, rows, 0.0) ** 2).sum(axis=1) / n)
    r = np.where(r > 0, r, rms(b) or 1.0)
    return r.reshape((-1,) + (1,) * (b.ndim - 1))


def excess(actual: np.ndarray, ref: np.ndarray, rtol: float, norms: np.ndarray | None = None) -> float:
    """The atol this pair needs, in units of each row's RMS: max over elements of (|a - r| - rtol |r|) / rms(row).

    The one error statistic of the verdict: the honest-noise model measures it
    on correct runs, and a tap passes when its own is within the bound built
    from theirs. inf when non-finite values differ. `norms` overrides the rows'
    RMS (a reduced tap knows its rows' RMS from the whole tensor). Computed by
    `compare_arrays`, which the comparison calls once per tap for everything.
    """
    norms = row_norms(ref) if norms is None else norms
    return compare_arrays(actual, ref, "float64", 0.0, rtol, norms=norms)["excess"]


def allowed_error(ref: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """torch.testing's shape, |a - b| <= atol + rtol * |b|, elementwise."""
    return atol + rtol * np.abs(ref)


def compare_arrays(actual: np.ndarray, ref: np.ndarray, dtype: str, atol, rtol: float,
                   norms: np.ndarray | None = None) -> dict:
    """Every metric of one pair in float64; `atol` may be an array broadcasting against the tap (per row).

    With `norms` (each row's RMS, parity.numerics.metrics.row_norms) the result also holds `excess`, the verdict's
    statistic: the atol needed in units of the rows' RMS (inf when non-finite values differ).
    """
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} != reference shape {b.shape}")
    diff = abs_error(a, b)
    finite = bool(np.array_equal(np.isfinite(a), np.isfinite(b)))  # inf only where the reference has it
    b = np.where(np.isfinite(b), b, 0.0)
    flat = int(np.argmax(diff)) if diff.size else 0
    where = tuple(int(i) for i in np.unravel_index(flat, diff.shape)) if diff.size else ()
    absb = np.abs(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(absb > 0, diff / absb, np.where(diff > 0, np.inf, 0.0))
    bad = diff > allowed_error(b, atol, rtol)
    a = np.where(np.isfinite(a), a, 0.0)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na > 0 and nb > 0 and finite else float("nan")
    ulps = diff / ulp_of(b, dtype if dtype in _FORMATS else "float64")
    # the atol that would have passed with this rtol: smallest atol with no mismatch
    needed_atol = float(np.max(diff - rtol * absb)) if diff.size else 0.0
    extra = {}
    if norms is not None:
        over = (diff - rtol * absb) / norms
        extra["excess"] = max(float(np.max(over)), 0.0) if diff.size else 0.0
        # per row (a token; a decode step): the decode's per-step error
        extra["row_excess"] = np.maximum(over.reshape(over.shape[0], -1).max(axis=1), 0.0) \
            if over.ndim and over.size else np.zeros(0)
    return {
        **extra,
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float(rel.max()) if rel.size else 0.0,
        "where": list(where),
        "mismatched": int(bad.sum()),
        "numel": int(diff.size),
        "mismatch_fraction": float(bad.mean()) if diff.size else 0.0,
        "max_ulp": float(ulps.max()) if ulps.size else 0.0,
        "cosine": cos,
        "ref_rms": rms(b),
        "needed_atol": max(needed_atol, 0.0),
        "finite": bool(finite),
    }


def abs_error(actual: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|a - r| elementwise in float64: 0 where equal (equal infinities, masked scores, agree), inf where NaN."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(a == b, 0.0, np.abs(a - b))
    return np.where(np.isnan(diff), np.inf, diff)


def sqnr_db(actual: np.ndarray, ref: np.ndarray) -> float:
    """Signal to quantisation noise, 10 log10(sum r^2 / sum (a - r)^2), in dB: inf when equal, -inf when the error
    is not finite or the reference is all zeros. The reference's non-finite values (masked scores) count as zero
    signal, and as zero noise where the implementation has the same value."""
    noise = float(np.sum(np.square(abs_error(actual, ref))))
    if noise == 0.0:
        return math.inf
    b = np.asarray(ref, dtype=np.float64)
    signal = float(np.sum(np.square(np.where(np.isfinite(b), b, 0.0))))
    if not math.isfinite(noise) or signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def error_percentile(actual: np.ndarray, ref: np.ndarray, q: float) -> float:
    """The q-th percentile (numpy's linear interpolation) of |a - r| / the RMS of r's row, over every element.

    Rows as in `row_norms` (the first axis). inf when the interpolation reaches an element that is not finite
    (NaN, or a value where the reference is -inf), where numpy would answer NaN.
    """
    e = (abs_error(actual, ref) / row_norms(ref)).ravel()
    if e.size == 0:
        return 0.0
    pos = q / 100.0 * (e.size - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    e = np.partition(e, [lo, hi])  # the two order statistics in place, no full sort (inf sorts last)
    t = pos - lo
    if not math.isfinite(e[lo]) or (t > 0 and not math.isfinite(e[hi])):
        return math.inf
    return float(e[lo] + (e[hi] - e[lo]) * t)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def logit_metrics(actual: np.ndarray, ref: np.ndarray, k: int = 5) -> dict:
    """KL(ref || actual) per position, top-1 agreement and top-k overlap. Shapes [T, vocab]."""
    lp, lq = log_softmax(ref), log_softmax(actual)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # [T]
    k = min(k, ref.shape[-1])
    top_ref = np.argsort(-ref, axis=-1)[:, :k]
    top_act = np.argsort(-np.asarray(actual, dtype=np.float64), axis=-1)[:, :k]
    overlap = [len(set(r) & set(a)) / k for r, a in zip(top_ref, top_act)]
    return {
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agree": float((top_ref[:, 0] == top_act[:, 0]).mean()),
        f"top{k}_overlap": float(np.mean(overlap)),
    }


def row_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row (first axis): max |x| and RMS over the finite values, the count of non-finite values, of NaNs.

    A row without finite values has max |x| and RMS 0. Rows are taken one at a time, so a float32 tap
    is never copied whole to float64 here.
    """
    x = np.asarray(x)
    rows = x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1)
    n = rows.shape[0]
    max_abs, row_rms = np.zeros(n), np.zeros(n)
    nonfinite, nans = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i, row in enumerate(rows):
        row = np.asarray(row, dtype=np.float64)
        finite = row[np.isfinite(row)]
        nonfinite[i] = row.size - finite.size
        nans[i] = int(np.isnan(row).sum()) if nonfinite[i] else 0
        if finite.size:
            max_abs[i] = np.abs(finite).max()
            row_rms[i] = np.sqrt(np.mean(np.square(finite)))
    return max_abs, row_rms, nonfinite, nans


def top_ids(x: np.ndarray, k: int = 5) -> np.ndarray:
    """The k largest entries' indices along the last axis of a [rows, n] array, largest first, int64.

    Deterministic: equal values rank by lower index (np.argmax's choice for the first), NaN ranks lowest.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"top_ids needs a [rows, n] array, got shape {x.shape}")
    k = min(k, x.shape[1])
    out = np.zeros((x.shape[0], k), np.int64)
    for i, row in enumerate(x):
        row = np.where(np.isnan(row), -np.inf, np.asarray(row, dtype=np.float64))
        cand = np.arange(row.size)
        if row.size > k:
            cand = np.flatnonzero(row >= np.partition(row, row.size - k)[row.size - k])  # ties may add a few
        out[i] = cand[np.lexsort((cand, -row[cand]))[:k]]
    return out


def np_dtype(dtype: str):
    import ml_dtypes

    return {"float64": np.float64, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
            "float16": np.float16}[dtype]


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values once to `dtype`, back in float64."""
    return np.asarray(x, dtype=np.float64).astype(np_dtype(dtype)).astype(np.float64)
