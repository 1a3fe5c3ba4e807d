"""The attention's probes: the rotary table's precision, the softmax's precision, and the mask and window
read off the scores' -inf pattern or, with care for underflow, off the probabilities."""

from __future__ import annotations

import numpy as np

from parity.capture.trace import ReducedTap, Trace
from parity.diagnose.probes._evidence import SUBNORMAL, Candidate, Probe, decide, trusted
from parity.diagnose.probes._registry import ProbeSpec, register
from parity.model.spec import GemmaSpec
from parity.numerics.metrics import np_dtype, round_to
from parity.numerics.tolerances import FORMATS

PRECISION_TIE = 0.01  # a low-precision table or softmax leading the runner-up by less is not told apart


# ------------------------------------------------------------------ rotary table precision
def probe_rope_precision(trace: Trace, spec: GemmaSpec, min_agreement: float = 0.98) -> Probe:
    """Which arithmetic produced layer 0's cos table: fp32 angles, a rounded inv_freq, or low-precision angles."""
    cos = trace.taps.get("rope.cos")
    if cos is None:
        return Probe.cannot_tell("rope-precision", "rope.cos", "the rotary table is not exposed")
    dtype = trace.dtype
    if dtype == "float64":
        return Probe.ok("rope-precision", "rope.cos", "float64 run: nothing to round")
    T, hd = cos.shape
    base, factor = spec.rope_base_for(0), spec.rope_factor_for(0)
    f32 = np.float32
    idx = np.arange(0, hd, 2, dtype=np.int64).astype(f32)
    inv32 = (f32(1.0) / (f32(base) ** (idx / f32(hd)))).astype(f32)  # [hd / 2], as HF computes it
    pos32 = (np.arange(T).astype(f32) / f32(factor)).astype(f32)

    def table(inv, pos, t=np.float32):
        ang = (pos.astype(t)[:, None] * inv.astype(t)[None, :]).astype(t)  # [T, hd / 2]
        return np.cos(np.concatenate([ang, ang], axis=-1).astype(np.float64))

    cands = [Candidate("fp32 angles, cos rounded once", None, table(inv32, pos32))]
    if dtype in ("bfloat16", "float16"):
        low = np_dtype(dtype)
        cands += [Candidate(f"inv_freq rounded to {dtype}", "rope-precision",
                            table(round_to(inv32, dtype).astype(f32), pos32), PRECISION_TIE),
                  Candidate(f"angles in {dtype}", "rope-precision", table(inv32.astype(low), pos32.astype(low), low),
                            PRECISION_TIE)]
    # the table does not depend on the weights and cos has no cancellation; only a cos within a subnormal
    # of zero is left out, as everywhere
    keep = trusted(dtype, cos, *(c.values for c in cands))
    return decide("rope-precision", "rope.cos", cos, cands, dtype, keep, SUBNORMAL, min_agreement,
                  correct=cands[0], extra={"positions": T}, says="rotary table from {best}",
                  unexplained="no candidate explains the cos table (best {score:.1%})")


# ------------------------------------------------------------------ softmax precision
def probe_softmax(trace: Trace, layer: int, min_agreement: float = 0.98) -> Probe:
    """Softmax of the implementation's own scores: in fp32 rounded once, or op by op in the dtype."""
    tap = f"layers.{layer}.attn.probs"
    scores, probs = trace.taps.get(f"layers.{layer}.attn.scores"), trace.taps.get(tap)
    if scores is None or probs is None:
        return Probe.cannot_tell("softmax", tap, "attention scores not exposed")
    dtype = trace.dtype
    s = np.asarray(scores, np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    cands = [Candidate("fp32, rounded once", None, e / e.sum(-1, keepdims=True))]
    if dtype in ("bfloat16", "float16"):
        el = round_to(np.exp(round_to(s - s.max(-1, keepdims=True), dtype)), dtype)
        cands.append(Candidate(f"op by op in {dtype}", "softmax-precision",
                               el / round_to(el.sum(-1, keepdims=True), dtype), PRECISION_TIE))
    # an attention sink leaves the other keys' probabilities tiny: in fp16 many are subnormal (below 6.1e-5),
    # where flush-to-zero and lost bits decide, not the softmax's order; masked keys (exact 0 in every
    # candidate) stay in
    keep = trusted(dtype, probs, *(c.values for c in cands))
    return decide("softmax", tap, probs, cands, dtype, keep, SUBNORMAL, min_agreement, correct=cands[0],
                  says="softmax {best}",
                  unexplained="no softmax candidate explains the probabilities (best {score:.1%})")


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
        return Probe.named("attention-mask", tap, "keys after the query are visible: the mask is not causal",
                           cause="sliding-window", evidence=ev)
    if span > expected_span or (wrong_hidden and span < expected_span):
        return Probe.named("attention-mask", tap, f"queries look back over {span} tokens, the spec says {what}",
                           cause="sliding-window", evidence=ev)
    if wrong_visible or wrong_hidden:
        return Probe.named("attention-mask", tap, f"the mask differs from the spec's ({what}) at "
                           f"{wrong_visible + wrong_hidden} query-key pairs", cause="sliding-window", evidence=ev)
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
        return Probe.cannot_tell("attention-mask", tap, "attention probabilities not exposed")
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
        return Probe.cannot_tell("attention-mask", tap, f"queries look back over {ev['widest look-back']} tokens "
                                 f"where the spec says {ev['expected']}, but the keys further back read 0 {why}; "
                                 "the scores (not exposed) would settle it", ev)
    if want is not None and T > want:
        # the window's far edge: some key just beyond it must be provably masked, or a wider window whose
        # extra keys underflowed would read the same
        edge = (i - j == want) & provable
        ev["masked just beyond the window"] = int(edge.sum())
        if not edge.any():
            return Probe.cannot_tell("attention-mask", tap, f"queries look back over {want} tokens as the spec says, "
                                     f"but no key just beyond the window is provably masked ({why})", ev)
    return _mask_ok(tap, want, T, ev, int(unproven.sum()))


def _mask_ok(tap: str, want: int | None, T: int, ev: dict, unproven: int = 0) -> Probe:
    kind = f"local, window {want}" if want else "global, causal"
    note = "" if T > (want or 0) else f" (prompt of {T} tokens is too short to see the window)"
    if unproven:
        note += f" ({unproven} zero probabilities where the spec shows the key are read as underflow, not mask)"
    return Probe.ok("attention-mask", tap, f"mask is {kind}{note}", ev)


register(ProbeSpec("rope_precision", lambda trace, spec, weights: probe_rope_precision(trace, spec), "rope.cos",
                   per_layer=False, causes=("rope-precision", "unexplained")))
register(ProbeSpec("softmax", lambda trace, spec, weights, layer: probe_softmax(trace, layer), "layers.{}.attn.probs",
                   per_layer=True, causes=("softmax-precision", "unexplained")))
register(ProbeSpec("attention_mask", lambda trace, spec, weights, layer: probe_attention_mask(trace, spec, layer),
                   "layers.{}.attn.probs", per_layer=True, causes=("sliding-window",)))
