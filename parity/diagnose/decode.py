"""Name the cause of a decode divergence: probes on what the cache and the mask hold, then counterfactuals.

A decode run fails at its first (step, tap). The evidence, at that step and in
the layers up to the divergent one, in the order that decides:

* the rotary table (`rope.cos`, where exposed) equals the reference's at
  another position, or a cached key is the reference's key rotated by a few
  positions while its value is right: `cache-position`;
* the set of keys the step attended to (finite scores, non-zero
  probabilities) differs from the positions it must see: off by one at a
  local layer's window edge, `cache-window`; anything else, `decode-mask`
  (unless the implementation's own full forward has the same mask: then the
  window is wrong in both paths, `sliding-window`, which the prefill names);
* a cache entry is missing or holds another position's key or value:
  `cache-stale` (missing at the window's edge only: `cache-window`).

Where these name nothing, the row-wise prefill probes (GELU, GeGLU: each token's own taps) are read on the
decode steps at the divergent tap. Where nothing is exposed, the port is re-run decoding with each decode-path
fault (parity.diagnose.counterfactuals.decode_candidates) in the implementation's dtype
and the one that reproduces the trace within the verdict's bounds, through the
divergent step and layer, names it. Framework-free but for the port re-runs.
"""

from __future__ import annotations

import math

import numpy as np

from parity.capture.decode import DECODE, FULL, SELF, visible
from parity.diagnose.finding import Finding
from parity.capture.runner import capture
from parity.compare.pairs import compare_trace, first_key, forward_order, used
from parity.diagnose import counterfactuals  # the module: its candidate tables are read when a search runs
from parity.diagnose.counterfactuals import Counterfactual
from parity.diagnose.search import UNCHANGED, Ranking, Wording, named, rank
from parity.model.spec import truncate

SHIFTS = (-3, -2, -1, 1, 2, 3)  # rotary offsets a position bug makes


def diagnose_decode(report) -> list[Finding]:
    """One entry per failing decode run (mode decode or decode-self), explaining its first divergence."""
    order = forward_order(report.spec)
    entries = []
    for run in report.runs:
        mode = run.mode
        if mode not in (DECODE, SELF):
            continue
        failing = [r for r in report.run_results(run.impl, run.dtype, mode) if not r.passed]
        if not failing:
            continue
        first = min(failing, key=lambda r: first_key(r, order))
        entries.append(explain(report, run.impl, run.dtype, mode, first, order))
    return entries


def _trace(report, impl, dtype, prompt, mode):
    return next((t for t in report.traces if (t.impl, t.dtype, t.prompt, t.mode) == (impl, dtype, prompt, mode)), None)


def _reference(report, impl, dtype, prompt, ref):
    """The full forward a decode run is compared with: a quantized run's is the port's on its held weights."""
    fn = getattr(report, "reference_trace", None)
    return fn(impl, dtype, prompt, FULL) if fn else _trace(report, *ref, prompt, FULL)


def explain(report, impl: str, dtype: str, mode: str, first, order) -> Finding:
    ref_name, ref_dtype = report.reference.split("@")
    dec = _trace(report, impl, dtype, first.prompt, DECODE)
    truth = _trace(report, impl, dtype, first.prompt, FULL) if mode == SELF else \
        _reference(report, impl, dtype, first.prompt, (ref_name, ref_dtype))
    own = _trace(report, impl, dtype, first.prompt, FULL)
    entry = dict(impl=impl, dtype=dtype, mode=mode, tap=first.tap, step=first.step, severity="divergence",
                 explains=first.tap)
    where = f"first divergence at decode step {first.step} (position {dec.prefill + first.step}), {first.tap}"
    failed = ""
    if dtype == "float16":  # float16's range decides first: past it the mask and cache probes read infinities
        got = _overflow(dec, truth, first)
        if got is not None:
            return Finding(**entry, cause="fp16-overflow", source="probe", evidence=f"{where}: {got}")
    try:
        found = probe(report.spec, dec, truth, own, first) if dec is not None and truth is not None else None
    except Exception as e:  # noqa: BLE001 -- a probe that breaks is reported with its error; counterfactuals go on
        found, failed = None, f"; the decode probes failed ({type(e).__name__}: {e})"[:300]
    where += failed
    if found is None and dec is not None:
        found = rowwise(report.spec, report.weights, dec, first)
    if found is not None:
        cause, evidence = found
        return Finding(**entry, cause=cause, source="probe", evidence=f"{where}: {evidence}")
    if report.weights is None:
        return Finding(**entry, cause="unexplained", source="first-divergence",
                       evidence=f"{where}; no probe names it, and counterfactuals need the weights")
    ranking = counterfactual(report, dec, first, order)
    found = named(ranking, where, dtype, DECODING)
    if found["cause"] == "kv-cache-precision":
        entry["severity"], text = kv_cache_severity(report, impl, dtype, dict(ranking.best.options)["decode_kv_quant"],
                                                    dec, truth)
        found["evidence"] += text
    return Finding(**entry, **found)


def _overflow(dec, truth, first) -> str | None:
    """fp16-overflow on the decode path: the step's row at the divergent tap overflows float16 where the
    reference's row exceeds its range (parity.diagnose.overflow, on one step's values)."""
    from parity.diagnose.overflow import overflow_of

    if dec is None or truth is None:
        return None
    a, r = _row(dec, first.tap, first.step), _row(truth, first.tap, first.step)
    return None if a is None or r is None else overflow_of(a, r, f"{first.tap} (decode step {first.step})")


def declared_kv_cache(report, impl: str, dtype: str) -> str | None:
    """The KV-cache type a run declares (its effective configuration's library fact `kv_cache_type`, a
    parity.numerics.act_quant kind), None where it declares none."""
    eff = (getattr(report, "effective", None) or {}).get(f"{impl}@{dtype}") or {}
    got = (eff.get("library") or {}).get("kv_cache_type")
    return str(got) if got else None


def kv_cache_severity(report, impl, dtype, kind: str, dec, truth) -> tuple[str, str]:
    """("note" or "divergence", a clause for the evidence) for a decode that a cache rounding K/V as `kind`
    reproduces: a note where the run declared that cache type (the loss is what such a cache honestly loses,
    measured here on the cache taps), a divergence where a cache rounds that the run did not declare."""
    loss = cache_loss(dec, truth)
    measured = f"; the cached K/V differ from the reference's by {loss:.3g} x their RMS at most" if loss else ""
    declared = declared_kv_cache(report, impl, dtype)
    if declared == kind:
        return "note", f"{measured}; the run declares a {kind} KV cache: what that cache type loses, a note"
    if declared:  # a q4_0 cache where q8_0 was declared: rounded coarser (or otherwise) than the run says
        return "divergence", (f"{measured}; the run declares a {declared} KV cache, but its K/V are rounded as a "
                               f"{kind} cache rounds them: a cache rounded other than declared")
    return "divergence", f"{measured}; the run declares no rounding KV-cache type: a cache that rounds undeclared"


def cache_loss(dec, truth) -> float | None:
    """The largest |cached K or V - the reference's| over their RMS, over every layer and step both hold
    (entries the two caches lay out alike; None where neither exposes its cache)."""
    worst = None
    for tap in dec.taps if truth is not None else ():
        if ".cache." not in tap or tap not in truth.taps:
            continue
        a, b = np.asarray(dec.taps[tap], np.float64), np.asarray(truth.taps[tap], np.float64)
        if a.shape != b.shape:
            continue
        ok = np.isfinite(a) & np.isfinite(b)
        if not ok.any():
            continue
        e = float(np.max(np.abs(a - b)[ok])) / _rms(b[ok])
        worst = e if worst is None else max(worst, e)
    return worst


# ------------------------------------------------------------------ probes
def probe(spec, dec, truth, own, first) -> tuple[str, str] | None:
    s = first.step
    last = first.layer if first.layer is not None else spec.num_layers - 1
    tol = max(first.bound, 1e-12)
    got = _rope_shift(dec, truth, s, tol)
    if got is not None:
        return "cache-position", got
    for i in range(last + 1):
        got = _mask(spec, dec, truth, own, s, i)
        if got is not None:
            return got
        got = _cache(spec, dec, truth, s, i, tol)
        if got is not None:
            return got
    return None


# probes that map each token's own taps to its own tap, never another position's: a decode trace's rows
# ([steps, ...], one token a step) read as a prefill's ([T, ...]), so they judge the decode path's own arithmetic
# (llama.cpp's float16 GELU table in the decode graph, whose steps flip table entries the prefill's did not)
ROWWISE_PROBES = ("gelu", "geglu", "geglu-fused")


def rowwise(spec, weights, dec, first) -> tuple[str, str] | None:
    """The cause a row-wise probe names at the divergent tap, read on the decode trace's steps."""
    from parity.diagnose.probes import PROBES

    if first.layer is None:
        return None
    for name in ROWWISE_PROBES:
        ps = PROBES.get(name)
        if ps is None or ps.tap_at(first.layer) != first.tap:
            continue
        got = ps.fn(dec, spec, weights, first.layer)
        for p in got if isinstance(got, list) else [got]:
            if p.cause not in (None, "unexplained"):
                return p.cause, f"{name} probe on the decode steps: {p.sentence()}"
    return None


def _row(trace, tap, s):
    if trace is None or tap not in trace.taps:
        return None
    a = trace.taps[tap]
    if not isinstance(a, np.ndarray) and not hasattr(a, "__array__"):
        return None  # reduced
    a = np.asarray(a, np.float64)
    return a[s] if s < a.shape[0] else None


def _rms(x) -> float:
    x = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(x * x))) if x.size else 1.0


def _rope_shift(dec, truth, s, tol) -> str | None:
    a, ref = _row(dec, "rope.cos", s), truth.taps.get("rope.cos")
    if a is None or ref is None:
        return None
    ref = np.asarray(ref, np.float64)
    scale = _rms(ref[s])
    if np.max(np.abs(a - ref[s])) / scale <= tol:
        return None
    for d in sorted(SHIFTS, key=abs):
        if 0 <= s + d < ref.shape[0] and np.max(np.abs(a - ref[s + d])) / scale <= tol:
            return (f"rope.cos at step {s} is the reference's table at position {dec.prefill + s + d}, {d:+d} from "
                    f"the token's position {dec.prefill + s}: the new token is rotated at the wrong position")
    return None


def _visible_set(trace, layer, s) -> np.ndarray | None:
    sc = _row(trace, f"layers.{layer}.attn.scores", s)
    if sc is not None:
        return np.isfinite(sc).any(axis=0)  # [n, T] -> [T]
    pr = _row(trace, f"layers.{layer}.attn.probs", s)
    if pr is not None:
        return (pr > 0).any(axis=0)
    return None


def _mask(spec, dec, truth, own, s, layer) -> tuple[str, str] | None:
    seen = _visible_set(dec, layer, s)
    if seen is None:
        return None
    p = dec.prefill + s
    must = np.zeros_like(seen)
    must[visible(spec, layer, p)] = True
    if np.array_equal(seen, must):
        return None
    extra, lacking = np.flatnonzero(seen & ~must), np.flatnonzero(must & ~seen)
    text = (f"layer {layer} at position {p} attends to {int(seen.sum())} keys, must see {int(must.sum())}"
            + (f"; sees also {extra[:4].tolist()}" if extra.size else "")
            + (f"; lacks {lacking[:4].tolist()}" if lacking.size else ""))
    own_seen = _visible_set(own, layer, s)
    if own_seen is not None and np.array_equal(own_seen, seen):
        return "sliding-window", text + "; its own full forward masks the same: the window is wrong in both paths"
    w = spec.window_for(layer)
    edge = {p - w, p - w + 1} if w else set()
    if w and set(extra.tolist()) | set(lacking.tolist()) <= edge:
        return "cache-window", text + f" (the window's edge; window {w}); its own full forward masks correctly"
    return "decode-mask", text + "; its own full forward at this position masks correctly"


def _cache(spec, dec, truth, s, layer, tol) -> tuple[str, str] | None:
    k, kr = _row(dec, f"layers.{layer}.cache.k", s), _row(truth, f"layers.{layer}.cache.k", s)
    v, vr = _row(dec, f"layers.{layer}.cache.v", s), _row(truth, f"layers.{layer}.cache.v", s)
    if k is None or kr is None:
        return None
    p = dec.prefill + s
    pos = visible(spec, layer, p)
    scale = _rms(kr[:, :len(pos)])
    err = lambda a, b: float(np.max(np.abs(a - b))) / scale if np.all(np.isfinite(a)) else math.inf  # noqa: E731
    bad = [j for j in range(len(pos)) if not err(k[:, j], kr[:, j]) <= tol]
    if v is not None and vr is not None:
        bad = sorted(set(bad) | {j for j in range(len(pos)) if not err(v[:, j], vr[:, j]) <= tol})
    if not bad:
        return None
    missing = [j for j in bad if not np.all(np.isfinite(k[:, j]))]
    w = spec.window_for(layer)
    if missing:
        at = [int(pos[j]) for j in missing]
        if w and set(at) <= {p - w + 1}:
            return "cache-window", (f"layer {layer}'s cache lacks position {at[0]} at position {p}, the window's "
                                    f"edge (window {w}): it keeps one key too few")
        return "cache-stale", f"layer {layer}'s cache holds no entry for position(s) {at[:4]} at position {p}"
    blank = [int(pos[j]) for j in bad if not np.any(k[:, j]) and (v is None or not np.any(v[:, j]))]
    if blank:  # a preallocated slot the update never wrote (the update index off, or the write skipped)
        return "cache-stale", (f"layer {layer}'s cache slot for position(s) {blank[:4]} still holds zeros at position "
                               f"{p}: never written")
    keys = _all_positions(spec, truth, layer, "k")
    vals = _all_positions(spec, truth, layer, "v")
    for j in bad:
        q = int(pos[j])
        for other, kk in keys.items():
            if other != q and err(k[:, j], kk) <= tol:
                return "cache-stale", (f"layer {layer}'s cache entry for position {q} holds position {other}'s key "
                                       f"at position {p}: a slot written in the wrong place or not overwritten")
        if v is not None and q in vals and err(v[:, j], vals[q]) <= tol:
            d = _rotation(spec, layer, k[:, j], kr[:, j], scale, tol)
            if d is not None:
                return "cache-position", (f"layer {layer}'s cached key for position {q} is the reference's rotated "
                                          f"by {d:+d} positions (its value is right): RoPE applied at position "
                                          f"{q + d}")
    return None


def _all_positions(spec, truth, layer, part) -> dict[int, np.ndarray]:
    """position -> the reference's key (or value) there, from every step's row of the cache tap."""
    tap = f"layers.{layer}.cache.{part}"
    if tap not in truth.taps:
        return {}
    a = np.asarray(truth.taps[tap], np.float64)  # [S, kv, V, hd]
    out = {}
    for s in range(a.shape[0]):
        for j, q in enumerate(visible(spec, layer, truth.prefill + s)):
            out.setdefault(int(q), a[s, :, j])
    return out


def rotate(x: np.ndarray, spec, layer: int, d: int) -> np.ndarray:
    """A post-RoPE key [kv, hd] moved by d positions (RoPE composes: R(p + d) = R(d) R(p)); half-split pairs."""
    hd = x.shape[-1]
    inv = 1.0 / spec.rope_base_for(layer) ** (np.arange(0, hd, 2) / hd)
    ang = d / spec.rope_factor_for(layer) * np.concatenate([inv, inv])  # [hd]
    half = hd // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _rotation(spec, layer, k, kr, scale, tol) -> int | None:
    for d in sorted(SHIFTS, key=abs):
        if float(np.max(np.abs(k - rotate(kr, spec, layer, d)))) / scale <= tol:
            return d
    return None


# ------------------------------------------------------------------ counterfactuals
DECODING = Wording(rerun="the port decoding with", through="that step and layer",
                   nothing="no probe and no decode-path counterfactual reproduces it",
                   correct="the correct port decoding in {dtype}")


def counterfactual(report, dec, first, order) -> Ranking:
    """Rank the decode-path faults by how well the port decoding with each reproduces `dec` through the first
    divergent step and layer."""
    import dataclasses

    spec, layer = report.spec, first.layer
    weights = report.weights_for(first.impl, first.dtype) if hasattr(report, "weights_for") else report.weights
    noise = report.noise_for(first.impl, first.dtype) if hasattr(report, "noise_for") else report.noise
    last = order.get(f"layers.{layer}.out", order.get(first.tap, 0)) if layer is not None else order.get(first.tap, 0)
    run_spec = truncate(spec, layer + 1) if layer is not None else spec
    run_weights = weights.truncated(run_spec) if run_spec != spec else weights
    # the whole continuation is decoded (attention and cache taps are laid out over all its positions), and
    # the steps up to the divergent one compared
    prompt, cont = dec.tokens[:dec.prefill], dec.tokens[dec.prefill:]
    upto = first.step + 1

    def head(t):  # [steps, ...] -> [upto, ...], the taps through the divergent layer
        return dataclasses.replace(t, taps={k: np.asarray(v)[:upto] for k, v in t.taps.items()
                                            if order.get(k, 10**6) <= last})

    mine = head(dec)

    def reproduce(cf: Counterfactual | None) -> float | None:
        adapter = (cf or Counterfactual("none", UNCHANGED)).adapter()
        got = capture(adapter, run_spec, run_weights, dec.dtype, {dec.prompt: list(prompt)}, mode=[DECODE],
                      continuation=list(cont))
        ours = head(next(t for t in got if t.mode == DECODE))
        ours.spec, ours.weights_hash = dec.spec, dec.weights_hash
        return max((used(r) for r in compare_trace(ours, mine, report.tolerances, DECODE, noise, metrics=False)), default=None)

    def variants():  # a generator: the candidates are listed only if the baseline fails
        yield from counterfactuals.decode_candidates(run_spec)

    return rank(variants(), reproduce)
