"""Gemma 4 mixture-of-experts probes, each on the run's own taps (no upstream error leaks in).

* `moe-router-probs` (at `moe.router_probs`): are the probabilities the run ranked its experts by rounded to a
  dtype narrower than fp32 (every one exactly a bf16/fp16 value)? Then the top k and the renormalisation ran
  on rounded probabilities: `router-precision`.
* `moe-router-weights` (at `moe.weights`): are the run's weights its own chosen probabilities renormalised
  (Gemma), or the chosen probabilities as they are (`topk-not-renormalised`)?
* `moe-experts` (at `moe_branch`): the expert branch recomputed in float64 from the run's own router input
  (`attn_residual`), chosen experts and weights, under each candidate: Gemma's, the per-expert scale left out
  or applied to the expert's input (`per-expert-scale-misplaced`), the gate and up halves swapped
  (`expert-gate-up-swapped`). The candidate nearest the run's `moe_branch` decides, when it is clearly
  nearer than the others.
"""

from __future__ import annotations

import numpy as np

from parity.capture.trace import Trace
from parity.diagnose.probes._evidence import Probe
from parity.diagnose.probes._registry import ProbeSpec, register
from parity.model.spec import GemmaSpec
from parity.numerics.metrics import round_to

NARROW = ("bfloat16", "float16")
# the nearest candidate decides when its relative RMS error is at most this share of the runner-up's: the
# candidates differ by tens of percent, the run's own rounding from the float64 recomputation by about
# one percent in bf16
CLEAR = 0.5
# and is itself within this relative RMS error of the run (a run none of the candidates reproduces: cannot tell)
CLOSE = {"float64": 1e-6, "float32": 1e-3, "bfloat16": 0.1, "float16": 0.02}


def _taps(trace: Trace, layer: int, *names: str):
    got = [trace.taps.get(f"layers.{layer}.{n}") for n in names]
    return None if any(v is None for v in got) else [np.asarray(v, np.float64) for v in got]


def probe_router_probs(trace: Trace, layer: int) -> Probe:
    tap = f"layers.{layer}.moe.router_probs"
    got = _taps(trace, layer, "moe.router_probs")
    if got is None:
        return Probe.cannot_tell("moe-router-probs", tap, "moe.router_probs not captured")
    (p,) = got
    for narrow in NARROW:
        exact = float(np.mean(round_to(p, narrow) == p))
        if exact == 1.0 and np.any((p > 0) & (p < 1)):
            return Probe.named("moe-router-probs", tap,
                               f"every router probability is a {narrow} value: rounded to {narrow} before the "
                               "top k and the renormalisation (fp32 keeps them unrounded)", "router-precision",
                               {"rounded_to": narrow, "share_exact": exact})
    return Probe.ok("moe-router-probs", tap, "the router probabilities are not rounded below fp32",
                    {"share_exact_bf16": float(np.mean(round_to(p, "bfloat16") == p))})


def probe_router_weights(trace: Trace, layer: int) -> Probe:
    tap = f"layers.{layer}.moe.weights"
    got = _taps(trace, layer, "moe.router_probs", "moe.experts", "moe.weights")
    if got is None:
        return Probe.cannot_tell("moe-router-weights", tap, "router_probs, experts or weights not captured")
    p, idx, w = got
    sel = np.take_along_axis(p, np.rint(idx).astype(np.int64), axis=-1)  # [T, k]: the run's own chosen probs
    cands = {"renormalised": (None, sel / sel.sum(-1, keepdims=True)), "as chosen": ("topk-not-renormalised", sel)}
    return _nearest("moe-router-weights", tap, w, cands, trace.dtype, "renormalised", "moe.weights = {best} probabilities")


def _rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    return y if w is None else y * w


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def expert_branch(h, idx, w, weights: dict, spec: GemmaSpec, layer: int, scale_at: str = "weights",
                  swapped: bool = False) -> np.ndarray:
    """moe_branch in float64 from the router input h [T, D], chosen ids and weights [T, k], under one candidate."""
    pre = f"model.layers.{layer}."
    t64 = lambda n: np.asarray(weights[pre + n], np.float64)  # noqa: E731
    m = _rms_norm(h, t64("pre_feedforward_layernorm_2.weight"), spec.norm_eps)
    gu, down, scale = t64("experts.gate_up_proj"), t64("experts.down_proj"), t64("router.per_expert_scale")
    i = spec.expert_intermediate_size
    out = np.zeros_like(h)
    ids = np.rint(idx).astype(np.int64)
    for t in range(h.shape[0]):
        for slot, e in enumerate(ids[t]):
            x = m[t] * scale[e] if scale_at == "input" else m[t]
            g, u = gu[e][:i] @ x, gu[e][i:] @ x  # [I] each
            if swapped:
                g, u = u, g
            y = down[e] @ (_gelu_tanh(g) * u)  # [D]
            out[t] += y * w[t, slot] * (scale[e] if scale_at == "weights" else 1.0)
    return _rms_norm(out, t64("post_feedforward_layernorm_2.weight"), spec.norm_eps)


def probe_experts(trace: Trace, spec: GemmaSpec, weights: dict, layer: int) -> Probe:
    tap = f"layers.{layer}.moe_branch"
    got = _taps(trace, layer, "attn_residual", "moe.experts", "moe.weights", "moe_branch")
    if got is None:
        return Probe.cannot_tell("moe-experts", tap, "attn_residual, experts, weights or moe_branch not captured")
    if not weights or f"model.layers.{layer}.experts.gate_up_proj" not in weights:
        return Probe.cannot_tell("moe-experts", tap, "the weights are not at hand (pass --weights)")
    h, idx, w, y = got
    cands = {"Gemma's (scale on the weights)": (None, expert_branch(h, idx, w, weights, spec, layer)),
             "per-expert scale left out": ("per-expert-scale-misplaced",
                                           expert_branch(h, idx, w, weights, spec, layer, "none")),
             "per-expert scale on the expert input": ("per-expert-scale-misplaced",
                                                      expert_branch(h, idx, w, weights, spec, layer, "input")),
             "gate and up halves swapped": ("expert-gate-up-swapped",
                                            expert_branch(h, idx, w, weights, spec, layer, swapped=True))}
    return _nearest("moe-experts", tap, y, cands, trace.dtype, "Gemma's (scale on the weights)",
                    "moe_branch = {best} expert branch")


def _nearest(name: str, tap: str, actual, cands: dict, dtype: str, correct: str, says: str) -> Probe:
    """The candidate with the least relative RMS error decides when it is close to the run and clearly nearer
    than every other; a tie with the correct candidate (scales near 1, equal halves) is not a finding."""
    a = np.asarray(actual, np.float64)
    scale = float(np.sqrt(np.mean(a * a))) or 1.0
    errs = {k: float(np.sqrt(np.mean((a - v) ** 2))) / scale for k, (_, v) in cands.items()}
    ranked = sorted(errs, key=errs.get)
    best, second = ranked[0], ranked[1]
    ev = {f"rel_err {k}": v for k, v in errs.items()}
    if errs[best] > CLOSE.get(dtype, 0.1):
        return Probe.cannot_tell(name, tap, f"no candidate reproduces it (nearest {best!r}, relative error "
                                 f"{errs[best]:.3g})", ev)
    if errs[best] > CLEAR * errs[second]:
        return Probe.cannot_tell(name, tap, f"{best!r} and {second!r} are about as near", ev)
    cause = cands[best][0]
    if cause is None or best == correct:
        return Probe.ok(name, tap, says.format(best=best), ev, finding=best)
    return Probe.named(name, tap, says.format(best=best), cause, ev, finding=best)


def _moe_only(fn):
    """A layer without experts has nothing to probe: no result at all, not a "cannot tell" on every dense model."""
    def probe(trace, spec, weights, layer):
        return fn(trace, spec, weights, layer) if f"layers.{layer}.moe.experts" in trace.taps else []
    return probe


register(ProbeSpec("moe-router-probs", _moe_only(lambda trace, spec, weights, layer: probe_router_probs(trace, layer)),
                   "layers.{}.moe.router_probs", per_layer=True, causes=("router-precision",)))
register(ProbeSpec("moe-router-weights", _moe_only(lambda trace, spec, weights, layer: probe_router_weights(trace, layer)),
                   "layers.{}.moe.weights", per_layer=True, causes=("topk-not-renormalised",)))
register(ProbeSpec("moe-experts", _moe_only(probe_experts), "layers.{}.moe_branch", per_layer=True,
                   causes=("per-expert-scale-misplaced", "expert-gate-up-swapped")))
