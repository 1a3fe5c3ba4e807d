"""Compare a trace with the reference trace, tap by tap, in forward order.

Sees only `tap -> array` and metadata: no framework is imported here.

Reduced taps (parity.capture.trace.ReducedTap, a trace saved with `reduce_over`) are
compared on the rows both sides hold (a full array is reduced to the other
side's rows), with the atol the full comparison would use (the reference's
full-tensor RMS); the result says `sampled` and how many elements it compared.
Every row's max |x|, RMS and non-finite count are compared too, with bounds
that any pair passing the elementwise check satisfies (|max|a| - max|b|| and
|rms(a) - rms(b)| are at most atol + rtol * the reference's), so a row that
breaks them fails the full comparison as well: that is how a fault in an
unsampled row can still be seen. One that keeps those statistics within bounds
is not seen (for logits, top-1 agreement over every position still counts an
argmax it changes).
"""

from __future__ import annotations

from typing import Literal

import dataclasses
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from parity.errors import ParityInputError
from parity.numerics import metric_registry
from parity.numerics.metrics import compare_arrays, logit_metrics, rms, row_norms
from parity.model.taps import decode_tap_order, layer_of
from parity.numerics.tolerances import NOISE_MARGIN, TOLERANCES, Tolerance, growth
from parity.capture.decode import DECODE, FULL, SELF
from parity.capture.trace import ReducedTap, Trace, reduce_at

DECODE_MODES = (DECODE, SELF)  # rows are decode steps

STAT_SLACK = 1e-12  # relative rounding allowed in the row statistics' bounds (float64 sums)


Failure = Literal["", "shape", "nonfinite", "unmasked", "no-common-rows", "row-statistics"]

@dataclass
class TapResult:
    impl: str
    dtype: str
    mode: str
    prompt: str
    tap: str
    layer: int | None
    max_abs: float  # over the elements compared (sampled rows, for a reduced tap)
    max_rel: float
    atol: float  # absolute, as applied to this tap
    rtol: float
    passed: bool
    mismatched: int = 0  # among the elements compared
    numel: int = 0  # of the full tensor
    mismatch_fraction: float = 0.0  # mismatched / sampled_numel
    max_ulp: float = 0.0
    cosine: float = 1.0
    ref_rms: float = 0.0  # of the reference's full tensor
    where: list = field(default_factory=list)  # index into the full tensor
    needed_atol: float = 0.0
    logits: dict | None = None
    sampled: bool = False  # compared on some rows of a reduced tap, not on the whole tensor
    sampled_numel: int | None = None  # elements compared; numel unless sampled
    reason: str = ""  # why it failed, where the numbers above do not say it (for people: nothing parses it)
    # what kind of failure, for code: "" (the numbers say it), "shape", "nonfinite" (NaN or inf where the
    # reference is finite), "unmasked" (finite where the reference is -inf/inf), "no-common-rows" (reduced taps sharing no row), "row-statistics" (a reduced tap's
    # rows outside what any passing comparison has)
    failure: Failure = ""
    stat_rows_failed: int = 0  # rows whose max |x|, RMS or non-finite count rule out passing
    waived: str = ""  # the waiver accepting this tap's cause (parity.gate.waivers.apply_waivers), if any
    # the verdict's numbers, in units of each row's RMS (parity.numerics.metrics.excess): the tap passes when
    # stat <= bound, bound = max(floor, NOISE_MARGIN x noise)
    stat: float = 0.0  # the atol this tap needs
    bound: float = 0.0  # the atol it is allowed
    floor: float = 0.0  # the fixed table's atol (x depth growth): below it nothing fails
    noise: float | None = None  # the honest ensemble's largest stat at this tap (None: no honest runs)
    basis: str = "table"  # "honest": the bound came from the honest runs; "table": from the fixed table alone
    # decode runs (parity.capture.decode): rows are decode steps; `step` is the first step beyond the bound (else the
    # worst one) and `steps` every step's statistic. None for the prefill.
    step: int | None = None
    steps: list | None = None
    # every registered metric (parity.numerics.metric_registry) of the pair as compared, by name; empty when nothing
    # could be compared
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.sampled_numel is None:
            self.sampled_numel = self.numel

    def to_json(self) -> dict:
        d = asdict(self)
        if d["logits"] is None:
            d.pop("logits")
        return d

    def message(self) -> str:
        """torch.testing's shape: how many failed, worst abs and rel and where, the tolerance, what would pass."""
        at = f" step {self.step}" if self.step is not None else ""
        head = f"{self.impl}@{self.dtype} {self.mode} {self.tap}{at} [{self.prompt}]: "
        if self.reason and not self.sampled_numel:  # nothing was compared
            return head + self.reason
        pct = 100.0 * self.mismatched / max(self.sampled_numel, 1)
        counted = (f"{self.mismatched} / {self.sampled_numel} sampled elements (of {self.numel})" if self.sampled
                   else f"{self.mismatched} / {self.numel} elements")
        return (
            head + f"{counted} ({pct:.1f}%) beyond tolerance; "
            f"greatest absolute difference {self.max_abs:.3g} at index {tuple(self.where)} "
            f"(up to {self.atol:.3g} allowed), greatest relative difference {self.max_rel:.3g} "
            f"(up to {self.rtol:.3g} allowed); atol {self.needed_atol:.3g} with this rtol would have passed"
            + (f"; {self.reason}" if self.reason else "")
        )


def check_comparable(ref: Trace, other: Trace) -> None:
    if ref.weights_hash != other.weights_hash:
        raise ParityInputError(
            f"{other.label} was run on weights {other.weights_hash}, the reference on {ref.weights_hash}; "
            "capture both from the same weights"
        )
    if list(ref.tokens) != list(other.tokens):
        raise ParityInputError(f"{other.label} prompt {other.prompt!r} ran different tokens than the reference")
    if ref.spec != other.spec:
        diff = sorted(k for k in ref.spec if ref.spec.get(k) != other.spec.get(k))
        raise ParityInputError(f"{other.label} was built from a different spec (fields {diff}); use the same spec")


def compare_trace(
    ref: Trace, other: Trace, table: dict[str, Tolerance] | None = None, mode: str | None = None, noise=None,
    raw_logits: bool = False, metrics: bool = True,
) -> list[TapResult]:
    """One TapResult per tap both traces have, in the other's forward order; one pair of taps read at a time.
    `metrics=False` leaves the registered metrics out (a counterfactual's score needs only the verdict's numbers,
    and the search compares a hundred traces)."""
    if mode is not None and mode != other.mode:
        other = dataclasses.replace(other, mode=mode)
    return compare_traces(ref, [other], table, noise, raw_logits, metrics)[0]


def compare_traces(ref: Trace, others: list[Trace], table: dict[str, Tolerance] | None = None,
                   noise=None, raw_logits: bool = False, metrics: bool = True) -> list[list[TapResult]]:
    """`compare_trace` for several traces of the same prompt at once: each reference tap is read once.

    At real sizes the reference trace is the largest file (float64) and is read
    lazily; comparing run by run would read it once per run. `noise` (a
    parity.compare.noise.NoiseModel) gives each tap's honest error; without it the
    fixed table alone decides. Logits are compared up to a constant per
    position (which changes no distribution: a centred unembedding) unless
    `raw_logits`; the shift removed is kept in `TapResult.logits["shift"]`.
    """
    for o in others:
        check_comparable(ref, o)
    table = table or TOLERANCES
    n_layers = int(ref.spec["num_layers"])
    out: list[list[TapResult]] = [[] for _ in others]
    order = list(dict.fromkeys(t for o in others for t in o.taps))  # the runs' forward order, merged
    for tap in order:
        if tap not in ref.taps:
            continue
        expected = ref.taps[tap]
        for i, o in enumerate(others):
            if tap in o.taps:
                honest = noise.at(o.dtype, o.mode, o.prompt, tap) if noise is not None else None
                out[i].append(_compare_tap(tap, o.taps[tap], expected, o, o.mode, table[o.dtype], n_layers, honest,
                                           raw_logits, metrics))
        del expected
    return out


def compare_all(refs: dict[str, Trace], ref_full: dict[str, Trace], traces: list[Trace],
                table: dict[str, Tolerance] | None = None, noise=None, raw_logits: bool = False,
                layers: list[int] | None = None) -> list[TapResult]:
    """Every comparison a run's traces make, grouped by run (impl, dtype, mode) in order of first appearance.

    Prefill traces (cumulative, isolated) against their prompt's reference; decode traces against the
    reference's full forward over the same tokens (`ref_full`, mode decode) and against their own
    implementation's full forward (mode decode-self: the cache reproduces what the model computes without
    it). Full-forward traces are ground truth, not compared. Each reference tap is read once per prompt.
    """
    pairs = pair_traces(refs, ref_full, traces)
    per: dict[int, list[TapResult]] = {}
    refs_once = list({id(r): r for r, _ in pairs}.values())
    for ref in refs_once:  # one reference at a time, compared with all its traces
        group = [t for r, t in pairs if r is ref]
        for t, rs in zip(group, compare_traces(ref, group, table, noise, raw_logits)):
            per[id(t)] = rs
    selected = None if layers is None else set(layers)
    compared = [t for _, t in pairs]
    out = []
    for key in dict.fromkeys((t.impl, t.dtype, t.mode) for t in compared):
        for t in (t for t in compared if (t.impl, t.dtype, t.mode) == key):
            out += [r for r in per[id(t)] if selected is None or r.layer is None or r.layer in selected]
    return out


def pair_traces(refs: dict[str, Trace], ref_full: dict[str, Trace], traces: list[Trace]) -> list[tuple[Trace, Trace]]:
    """(reference, trace as compared) for every comparison `traces` make, in their order (see compare_all).

    The one pairing of traces: `harness.run` and `harness.from_traces` (traces read back from files) both
    compare through it. A decode trace is paired with the reference's full forward over the same tokens and,
    as mode decode-self, with its own implementation's full forward; full forwards are only ground truth.
    """
    pairs: list[tuple[Trace, Trace]] = []
    for t in traces:
        if t.mode in ("cumulative", "isolated") and t.prompt in refs:
            pairs.append((refs[t.prompt], t))
        elif t.mode == DECODE:
            if t.prompt in ref_full:
                pairs.append((ref_full[t.prompt], t))
            own = next((o for o in traces if (o.impl, o.dtype, o.prompt, o.mode) == (t.impl, t.dtype, t.prompt, FULL)),
                       None)
            if own is not None:
                pairs.append((own, dataclasses.replace(t, mode=SELF)))
    return pairs


def bound_for(floor: float, noise: float | None) -> tuple[float, str]:
    """The atol a tap is allowed (row-RMS units) and where it came from: beyond the table AND beyond
    NOISE_MARGIN times what correct implementations err here, or it passes."""
    if noise is None:
        return floor, "table"
    honest = NOISE_MARGIN * noise
    return (honest, "honest") if honest > floor else (floor, "table")


def _compare_tap(tap, actual, expected, other: Trace, mode: str, tol: Tolerance, n_layers: int,
                 noise: float | None = None, raw_logits: bool = False, metrics: bool = True) -> TapResult:
    base = dict(impl=other.impl, dtype=other.dtype, mode=mode, prompt=other.prompt, tap=tap, layer=layer_of(tap))
    floor = tol.atol * growth(tap, n_layers, mode)
    bound, basis = bound_for(floor, noise)
    verdict = dict(bound=bound, floor=floor, noise=noise, basis=basis)
    if isinstance(actual, ReducedTap) or isinstance(expected, ReducedTap):
        return _compare_reduced(base, actual, expected, tol, verdict, metrics)
    if actual.shape != expected.shape:
        return _failed(base, tol, expected.size, False,
                       f"shape {tuple(actual.shape)} != reference shape {tuple(expected.shape)}", verdict, "shape")
    norms = row_norms(expected)  # [..., 1]: each row's RMS
    shift = None
    m = compare_arrays(actual, expected, other.dtype, bound * norms, tol.rtol, norms)
    stat = m["excess"] if m["finite"] else float("inf")
    if tap == "logits" and not raw_logits and m["finite"]:
        # up to a constant per position, whichever is closer: removing the mean difference can move a
        # single element further, so the values as they are still count when they are the closer
        moved, by = _unshifted(actual, expected)
        mm = compare_arrays(moved, expected, other.dtype, bound * norms, tol.rtol, norms)
        if mm["excess"] < stat:
            actual, shift, stat, m = moved, by, mm["excess"], mm
    tap_rms = rms(expected) or 1.0  # finite values only, as a reduced tap's (masked scores hold -inf)
    reason, failure = ("", "") if m["finite"] else _nonfinite(actual, expected)
    per_step = {}
    if mode in DECODE_MODES:
        rows = [float(x) for x in m["row_excess"]]
        beyond = [s for s, x in enumerate(rows) if not x <= bound]  # NaN and inf are beyond
        per_step = dict(steps=rows, step=beyond[0] if beyond else int(np.argmax(rows)) if rows else None)
    r = TapResult(
        **base, max_abs=m["max_abs"], max_rel=m["max_rel"], atol=bound * tap_rms, rtol=tol.rtol,
        passed=m["mismatched"] == 0 and m["finite"], mismatched=m["mismatched"], numel=m["numel"],
        mismatch_fraction=m["mismatch_fraction"], max_ulp=m["max_ulp"], cosine=m["cosine"],
        ref_rms=m["ref_rms"], where=m["where"], needed_atol=stat * tap_rms, stat=stat, reason=reason, failure=failure, **verdict,
        **per_step, metrics=metric_registry.compute(actual, expected) if metrics else {},
    )
    if tap == "logits":
        r.logits = logit_metrics(actual, expected)
        if shift is not None:
            r.logits["shift"] = float(np.max(np.abs(shift) / norms.reshape(shift.shape), initial=0.0))
    return r


def _nonfinite(actual, expected) -> tuple[str, str]:
    """What is non-finite where the reference is not: NaN and inf named as such, with a first index; and the
    failure kind: "nonfinite" (NaN or inf of the implementation's own), else "unmasked" (only finite values
    where the reference is -inf/inf: a mask that lets through what the reference masks)."""
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    nan = np.isnan(a) & ~np.isnan(b)
    inf = np.isinf(a) & ~(np.isinf(b) & (np.sign(a) == np.sign(b)))
    lost = ~np.isfinite(b) & np.isfinite(a)
    parts = []
    for what, mask in (("NaN", nan), ("inf", inf), ("finite values where the reference is -inf/inf", lost)):
        if mask.any():
            first = tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))
            parts.append(f"{what} in {int(mask.sum())} element(s), first at {first}")
    kind = "nonfinite" if nan.any() or inf.any() else "unmasked"
    return "; ".join(parts) or "non-finite values differ from the reference's", kind


def _unshifted(actual, expected) -> tuple[np.ndarray, np.ndarray]:
    """`actual` less its mean difference from `expected` per position ([T, vocab] -> same; the shift [T, 1])."""
    a = np.asarray(actual, np.float64)
    d = a - np.asarray(expected, np.float64)
    fin = np.isfinite(d)
    shift = np.where(fin, d, 0.0).sum(-1, keepdims=True) / np.maximum(fin.sum(-1, keepdims=True), 1)
    return a - shift, shift


def _failed(base: dict, tol: Tolerance, numel: int, sampled: bool, reason: str, verdict: dict,
            failure: str) -> TapResult:
    """Nothing could be compared (a shape mismatch, no common rows): a divergence, not bad input, so a total failure."""
    return TapResult(**base, max_abs=float("inf"), max_rel=float("inf"), atol=0.0, rtol=tol.rtol, passed=False,
                     numel=int(numel), mismatched=int(numel), sampled=sampled, sampled_numel=0,
                     reason=reason, failure=failure, stat=float("inf"), **verdict)


def _compare_reduced(base: dict, actual, expected, tol: Tolerance, verdict: dict, metrics: bool = True) -> TapResult:
    """Either side reduced: the usual metrics on the rows both hold, plus every row's statistics."""
    shape_a, shape_e = tuple(actual.shape), tuple(expected.shape)
    numel = int(np.prod(shape_e))
    if shape_a != shape_e:
        return _failed(base, tol, numel, True, f"shape {shape_a} != reference shape {shape_e}", verdict, "shape")
    idx_a = actual.row_index if isinstance(actual, ReducedTap) else None
    idx_e = expected.row_index if isinstance(expected, ReducedTap) else None
    rows = idx_e if idx_a is None else idx_a if idx_e is None else np.intersect1d(idx_a, idx_e)
    if rows.size == 0:
        return _failed(base, tol, numel, True, f"no rows in common: reduced to rows {idx_a.tolist()}, "
                       f"the reference to rows {idx_e.tolist()}; reduce both with the same max_rows", verdict,
                       "no-common-rows")
    a, e = (_reduced_to(base["tap"], v, rows) for v in (actual, expected))
    # each row judged against its own RMS, which a reduced tap keeps for every row (parity.numerics.metrics.row_norms)
    whole = e.rms or 1.0
    row_rms = np.where(e.row_rms > 0, e.row_rms, whole)  # [rows]
    sampled = row_rms[rows].reshape((-1,) + (1,) * (len(shape_e) - 1))
    bound = verdict["bound"]
    pair = _rows_of(a, rows), _rows_of(e, rows)
    m = compare_arrays(*pair, base["dtype"], bound * sampled, tol.rtol, sampled)
    bad, need, reasons = _stats_beyond(a, e, bound * row_rms, tol.rtol)
    stat = max(m["excess"] if m["finite"] else float("inf"), float(np.max(need / row_rms, initial=0.0)))
    r = TapResult(
        **base, max_abs=m["max_abs"], max_rel=m["max_rel"], atol=bound * whole, rtol=tol.rtol,
        passed=m["mismatched"] == 0 and m["finite"] and not reasons, mismatched=m["mismatched"], numel=numel,
        mismatch_fraction=m["mismatch_fraction"], max_ulp=m["max_ulp"], cosine=m["cosine"],
        ref_rms=_zero_filled_rms(e),
        where=[int(rows[m["where"][0]])] + m["where"][1:] if m["where"] else [],
        needed_atol=stat * whole, sampled=True, sampled_numel=m["numel"], reason="; ".join(reasons),
        failure="" if not reasons else "row-statistics" if bad.size else "nonfinite",
        stat_rows_failed=int(bad.size), stat=stat, **verdict,
        metrics=metric_registry.compute(*pair) if metrics else {},
    )
    if base["tap"] == "logits":
        r.logits = _reduced_logit_metrics(a, e, rows)
    return r


def _reduced_to(tap: str, v, rows: np.ndarray) -> ReducedTap:
    return v if isinstance(v, ReducedTap) else reduce_at(tap, v, rows)


def _zero_filled_rms(v: ReducedTap) -> float:
    """compare_arrays' ref_rms: RMS with the non-finite values (masked scores) counted as zeros."""
    finite = v.numel - int(v.row_nonfinite.sum())
    return float(np.sqrt(v.rms**2 * finite / v.numel)) if v.numel else 0.0


def _rows_of(v: ReducedTap, rows: np.ndarray) -> np.ndarray:
    return v.rows[np.searchsorted(v.row_index, rows)]


def _stats_beyond(a: ReducedTap, e: ReducedTap, atol, rtol: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rows whose statistics no passing pair could have, per row a lower bound on the atol needed, and why.

    `atol` is per row (an array over the rows) or one number.

    If |a - e| <= atol + rtol |e| elementwise (and inf only where e has the same inf), then over each
    row's finite values |max|a| - max|e|| <= atol + rtol max|e| and (Minkowski) |rms(a) - rms(e)| <=
    rms(a - e) <= atol + rtol rms(e), and the non-finite counts agree. Any NaN fails elementwise too.
    """
    need = np.maximum(np.abs(a.row_max_abs - e.row_max_abs) - rtol * e.row_max_abs,
                      np.abs(a.row_rms - e.row_rms) - rtol * e.row_rms)
    slack = STAT_SLACK * np.maximum(a.row_max_abs, e.row_max_abs)
    nonfinite = a.row_nonfinite != e.row_nonfinite
    bad = np.flatnonzero((need > atol + slack) | nonfinite)
    reasons = []
    if bad.size:
        i = int(bad[0])
        allowed = float(np.broadcast_to(atol, need.shape)[i])
        reasons.append(
            f"{bad.size} of {len(need)} rows have statistics no passing comparison has (first: row {i}, "
            f"max|x| {a.row_max_abs[i]:.6g} vs reference {e.row_max_abs[i]:.6g}, RMS {a.row_rms[i]:.6g} vs "
            f"{e.row_rms[i]:.6g}, non-finite {int(a.row_nonfinite[i])} vs {int(e.row_nonfinite[i])}; "
            f"allowed difference {allowed:.3g} + {rtol:.3g} x reference)"
        )
    if a.nan_count or e.nan_count:
        reasons.append(f"NaN in {a.nan_count} element(s), in the reference {e.nan_count}")
    lower = np.where(nonfinite, np.inf, np.maximum(need, 0.0))
    return bad, lower, reasons


def _reduced_logit_metrics(a: ReducedTap, e: ReducedTap, rows: np.ndarray) -> dict:
    """KL and top-k overlap on the rows compared; top-1 agreement over every position where both have top ids."""
    out = logit_metrics(_rows_of(a, rows), _rows_of(e, rows))
    out["kl_rows"] = int(rows.size)
    out["top1_positions"] = int(rows.size)
    if a.top_ids is not None and e.top_ids is not None:
        out["top1_agree"] = float((a.top_ids[:, 0] == e.top_ids[:, 0]).mean())
        out["top1_positions"] = int(len(e.top_ids))
    return out


# ------------------------------------------------------------- the numbers every verdict and diagnosis reads
def used(r) -> float:
    """How much of its bound a tap used: its statistic over the bound (inf when nothing could be compared)."""
    return share(r.stat, r.bound)


def share(stat: float, bound: float) -> float:
    """A statistic (a tap's, or one decode step's) as a share of its bound."""
    if not math.isfinite(stat):
        return math.inf
    if bound <= 0:
        return 0.0 if stat == 0 else math.inf
    return stat / bound


def forward_order(spec) -> dict:
    """tap -> its place in forward order (decode traces' cache taps included)."""
    return {t: i for i, t in enumerate(decode_tap_order(spec))}


def first_key(r, order: dict) -> tuple:
    """Where a failing tap comes in the order a divergence propagates: decode step (the prefill first), then
    forward order."""
    return (-1 if r.step is None else r.step, order.get(r.tap, 10**6))
