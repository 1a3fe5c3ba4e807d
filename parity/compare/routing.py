"""Routing is discrete: which experts each token chose, compared as a choice, not as floats.

A mixture-of-experts layer picks the top k of E router probabilities per token
(`layers.{i}.moe.experts`, the chosen ids sorted by descending probability). An id
that differs from the reference's is not a small numeric error, so that tap is never
compared elementwise; this stage compares the choices instead and says, per
(run, prompt, layer), how many tokens chose other experts than the reference and why:

* an **honest flip**: the reference's k-th and (k+1)-th probabilities lie within what
  the run's dtype may move them (`honest_gap`: each of the two may move by NOISE_MARGIN
  times the honest ensemble's error at `moe.router_probs`, plus rtol of its value).
  Rounding alone can swap them; not a failure.
* a **clear flip**: the gap is wider than that. Rounding cannot explain it; the run's
  `moe.experts` tap fails and the diagnosis looks for the cause.

Taps downstream of an honest flip are compared with the run's routing accounted for
(`account`): in cumulative mode the reference is replayed (the float64 port re-run with
the run's choice forced at the honestly flipped tokens, `PortOptions.route_override`),
and every tap of that run is compared with the replayed reference; where no replay is
possible (isolated mode, traces without weights, a reference that is not the port),
the flipped tokens' rows are left out of that layer's downstream taps and the
exclusion is reported. One honest near-tie therefore never fails a whole layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from parity.compare.pairs import TapResult, compare_traces, pair_traces
from parity.model.taps import layer_of
from parity.numerics.tolerances import NOISE_MARGIN, TOLERANCES

EXPERTS, PROBS = "moe.experts", "moe.router_probs"
# the taps of a MoE layer that read the chosen experts (in forward order): where a flipped token's row differs
DOWNSTREAM = ("moe.weights", "moe_branch", "post_mlp_norm", "ple", "pre_scalar", "out")


@dataclass(frozen=True)
class Flip:
    """One token whose chosen experts differ (as a set) from the reference's."""
    token: int
    reference: tuple[int, ...]  # the reference's chosen ids, by descending probability
    chosen: tuple[int, ...]  # the run's
    margin: float  # the reference's k-th minus (k+1)-th probability
    allowed: float  # the widest gap rounding in the run's dtype can close here (honest_gap)

    @property
    def honest(self) -> bool:
        return self.margin <= self.allowed

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "honest": self.honest}


@dataclass(frozen=True)
class RoutingResult:
    """The routing comparison of one MoE layer of one run on one prompt."""
    impl: str
    dtype: str
    mode: str
    prompt: str
    layer: int
    tokens: int
    flips: tuple[Flip, ...] = ()
    accounted: str = ""  # how downstream taps took the honest flips into account: "replayed", "excluded" or ""

    @property
    def tap(self) -> str:
        return f"layers.{self.layer}.{EXPERTS}"

    @property
    def honest_flips(self) -> tuple[Flip, ...]:
        return tuple(f for f in self.flips if f.honest)

    @property
    def clear_flips(self) -> tuple[Flip, ...]:
        return tuple(f for f in self.flips if not f.honest)

    @property
    def share(self) -> float:
        """The share of tokens whose chosen experts differ from the reference's."""
        return len(self.flips) / self.tokens if self.tokens else 0.0

    @property
    def passed(self) -> bool:
        return not self.clear_flips

    def text(self) -> str:
        """One line for people: `layers.0 [long]: 1/48 tokens (2.1%) chose other experts: 1 honest ...`."""
        head = f"{self.impl}@{self.dtype} {self.mode} layers.{self.layer} [{self.prompt}]: "
        if not self.flips:
            return head + f"0/{self.tokens} tokens chose other experts"
        parts = []
        for what, fs in (("honest near-tie", self.honest_flips), ("at a clear margin", self.clear_flips)):
            if fs:
                f = fs[0]
                parts.append(f"{len(fs)} {what} (first: token {f.token}, reference {list(f.reference)} vs "
                             f"{list(f.chosen)}, gap {f.margin:.3g} against {f.allowed:.3g} rounding can cross)")
        how = {"replayed": "; downstream compared with the reference replaying the run's choice",
               "excluded": "; the flipped tokens' rows left out of this layer's downstream taps"}.get(self.accounted, "")
        return (head + f"{len(self.flips)}/{self.tokens} tokens ({100 * self.share:.1f}%) chose other experts: "
                + "; ".join(parts) + how)

    def to_json(self) -> dict:
        return {"impl": self.impl, "dtype": self.dtype, "mode": self.mode, "prompt": self.prompt,
                "layer": self.layer, "tokens": self.tokens, "flipped": len(self.flips),
                "share": self.share, "honest_flips": len(self.honest_flips), "clear_flips": len(self.clear_flips),
                "passed": self.passed, "accounted": self.accounted, "flips": [f.to_json() for f in self.flips]}


def moe_layers(trace) -> list[int]:
    return [layer_of(t) for t in trace.taps if t.endswith("." + EXPERTS)]


def _ids(a) -> np.ndarray:
    return np.rint(np.asarray(a, np.float64)).astype(np.int64).reshape(-1, np.shape(a)[-1])  # [T, k]


def compare_routing(ref, other, table=None, noise=None) -> list[RoutingResult]:
    """One RoutingResult per MoE layer both traces hold in full (a reduced tap's rows are not ids)."""
    from parity.capture.trace import ReducedTap

    table = table or TOLERANCES
    tol = table[other.dtype]
    out = []
    for layer in moe_layers(other):
        tap, probs_tap = f"layers.{layer}.{EXPERTS}", f"layers.{layer}.{PROBS}"
        got = [other.taps.get(tap), ref.taps.get(tap), ref.taps.get(probs_tap)]
        if any(v is None or isinstance(v, ReducedTap) for v in got):
            continue
        mine, theirs = _ids(got[0]), _ids(got[1])
        p = np.asarray(got[2], np.float64).reshape(-1, np.shape(got[2])[-1])  # [T, E]
        k = theirs.shape[1]
        honest = noise.at(other.dtype, other.mode, other.prompt, probs_tap) if noise is not None else None
        flips = []
        for t in range(min(len(mine), len(theirs))):
            if set(mine[t].tolist()) == set(theirs[t].tolist()):
                continue
            ps = np.sort(p[t])[::-1]
            margin = float(ps[k - 1] - ps[k]) if k < len(ps) else float("inf")
            allowed = honest_gap(float(ps[k - 1]), float(np.sqrt(np.mean(p[t] ** 2))), honest, tol.rtol)
            flips.append(Flip(t, tuple(theirs[t].tolist()), tuple(mine[t].tolist()), margin, allowed))
        out.append(RoutingResult(other.impl, other.dtype, other.mode, other.prompt, layer, len(theirs), tuple(flips)))
    return out


def honest_gap(p_k: float, row_rms: float, noise: float | None, rtol: float) -> float:
    """The widest gap between the k-th and (k+1)-th probability that rounding can close: each of the two may move
    by NOISE_MARGIN times the honest error (the honest ensemble's statistic at `moe.router_probs`, in units of the
    row's RMS, plus the dtype's rtol of the value, which that statistic leaves out). Not the table's floor: the
    floor bounds structural faults, far wider than any rounding of a probability. Without honest runs, rtol alone."""
    per = (noise or 0.0) * row_rms + rtol * p_k
    return 2 * NOISE_MARGIN * per


def as_tap_result(r: RoutingResult, base: TapResult | None) -> TapResult:
    """The `moe.experts` tap's verdict from its routing: it fails exactly when a token flipped at a clear margin.
    stat is the widest flipped gap over the gap rounding can cross (<= 1: honest), bound 1."""
    worst = max((f.margin / f.allowed if f.allowed > 0 else float("inf") for f in r.flips), default=0.0)
    clear = r.clear_flips
    reason = "" if not r.flips else r.text().split(": ", 1)[1]
    kw = dict(impl=r.impl, dtype=r.dtype, mode=r.mode, prompt=r.prompt, tap=r.tap, layer=r.layer,
              max_abs=float(len(r.flips)), max_rel=r.share, atol=0.0, rtol=0.0, passed=not clear,
              mismatched=len(clear), numel=r.tokens, mismatch_fraction=len(clear) / max(r.tokens, 1),
              where=[clear[0].token] if clear else [], stat=worst, bound=1.0, floor=1.0,
              noise=base.noise if base is not None else None, basis=base.basis if base is not None else "table",
              reason=reason, cosine=1.0)
    return TapResult(**kw)


Replay = Callable[[object, tuple], object]  # (reference trace, overrides) -> the reference re-run with them


def account(results: list[TapResult], refs: dict, traces: list, table=None, noise=None,
            replay: Replay | None = None, layers: list[int] | None = None,
            ref_full: dict | None = None) -> tuple[list[TapResult], list[RoutingResult]]:
    """`results` (parity.compare.pairs.compare_all's) with routing taken into account, and the routing itself.

    Every compared trace with MoE layers (paired as compare_all pairs them: decode traces with the reference's
    full forward and with their own) gets its routing compared; its `moe.experts` results become routing
    verdicts; where it flipped honestly its other taps are compared again: against the replayed reference
    (cumulative, `replay` given) or with the flipped rows (tokens; decode steps) left out of that layer's
    downstream taps.
    """
    table = table or TOLERANCES
    routing: list[RoutingResult] = []
    replaced: dict[tuple, list[TapResult]] = {}  # (impl, dtype, mode, prompt) -> that trace's new results
    for ref, t in pair_traces(refs, ref_full or {}, traces):
        if not moe_layers(t):
            continue
        rs = compare_routing(ref, t, table, noise)
        if not any(r.honest_flips for r in rs):
            routing += rs
            continue
        if t.mode == "cumulative" and replay is not None:
            rs, new = _replayed(ref, t, table, noise, replay, rs)
        else:
            new = _excluded(ref, t, table, noise, rs)
            rs = [dataclasses.replace(r, accounted="excluded") if r.honest_flips else r for r in rs]
        routing += rs
        replaced[(t.impl, t.dtype, t.mode, t.prompt)] = new
    if layers is not None:
        routing = [r for r in routing if r.layer in set(layers)]
    by_key = {(r.impl, r.dtype, r.mode, r.prompt, r.tap): r for r in routing}
    out = []
    for r in results:
        key = (r.impl, r.dtype, r.mode, r.prompt)
        if key in replaced:
            r = next((x for x in replaced[key] if x.tap == r.tap), r)
        if (*key, r.tap) in by_key:
            r = as_tap_result(by_key[(*key, r.tap)], r)
        out.append(r)
    return out, routing


def _replayed(ref, t, table, noise, replay: Replay, rs: list[RoutingResult]):
    """Replay the run's honest choices in the reference until no new honest flip appears (each replay can move
    the later layers' routing); the routing is then judged, and every tap compared, against the last replay."""
    overrides: dict[tuple[int, int], tuple[int, ...]] = {}
    found: dict[tuple[int, int], Flip] = {}  # each honest flip as first seen, at the margin of the reference it left
    current = ref
    for _ in range(int(ref.spec["num_layers"])):  # each replay can reveal flips further down, never above
        new = {(r.layer, f.token): f for r in rs for f in r.honest_flips}
        if not new:
            break
        for key, f in new.items():
            found.setdefault(key, f)
            overrides[key] = f.chosen
        current = replay(ref, tuple(sorted(overrides.items())))
        rs = compare_routing(current, t, table, noise)
    out = []
    for r in rs:
        fixed = tuple(f for (layer, _), f in found.items() if layer == r.layer)
        flips = tuple(sorted(fixed + r.flips, key=lambda f: f.token))
        out.append(dataclasses.replace(r, flips=flips, accounted="replayed" if fixed else ""))
    (new_results,) = compare_traces(current, [t], table, noise)
    return out, new_results


def _excluded(ref, t, table, noise, rs: list[RoutingResult]) -> list[TapResult]:
    """The run's taps compared again with each honestly flipped token's rows left out of its layer's downstream
    taps (rows are tokens: [T, ...])."""
    drop = {r.layer: sorted(f.token for f in r.honest_flips) for r in rs if r.honest_flips}
    keep = lambda a, rows: np.delete(np.asarray(a), rows, axis=0)  # noqa: E731 -- [T, ...] -> [T - n, ...]
    names = [f"layers.{layer}.{d}" for layer in drop for d in DOWNSTREAM]
    names = [n for n in names if n in t.taps and n in ref.taps]
    sub = lambda tr: dataclasses.replace(tr, taps={n: keep(tr.taps[n], drop[layer_of(n)]) for n in names})  # noqa: E731
    (cut,) = compare_traces(sub(ref), [sub(t)], table, noise)
    (whole,) = compare_traces(ref, [t], table, noise)
    cut_by = {r.tap: r for r in cut}
    out = []
    for r in whole:
        c = cut_by.get(r.tap)
        if c is not None:
            n = len(drop[layer_of(r.tap)])
            c.reason = (c.reason + "; " if c.reason else "") + f"{n} honestly flipped token row(s) left out"
            r = c
        out.append(r)
    return out


def replayer(adapter, spec, weights) -> Replay | None:
    """A replay for the project's port as reference (None for any other reference: it cannot force a route)."""
    from parity.adapters.litgpt_style import LitgptStyleAdapter

    if not isinstance(adapter, LitgptStyleAdapter) or weights is None:
        return None

    def replay(ref, overrides: tuple):
        from parity.adapters.port_model import PortOptions
        from parity.capture.runner import capture

        opts = dataclasses.replace(adapter.options or PortOptions(), route_override=overrides)
        forced = LitgptStyleAdapter(opts, adapter.spec_changes, name=ref.impl)
        (got,) = capture(forced, spec, weights, ref.dtype, {ref.prompt: list(ref.tokens)}, mode="cumulative")
        return got

    return replay


def summary(routing: list[RoutingResult]) -> list[dict]:
    """report.json's "routing": every (run, prompt, layer), flips with their margins."""
    return [r.to_json() for r in routing]
