"""Quantization loss: a quantized run against the unquantized reference, reported apart from the verdict.

A quantized run is judged against the float64 port on the weights it holds (parity.adapters.base.Held), so a
wrong kernel, graph or cache shows at the same strictness as in an unquantized run. What the quantization itself
costs is this module's number: the run against the reference on the weights it was given, per layer (the largest
error of the layer's taps in units of each row's RMS, as the verdict measures) and at the logits as users feel
it (KL(reference || run) of the next-token distributions, mean and max over positions, and top-1 agreement).
It is checked against a budget (mean KL, nats; `--quant-budget`), never mixed into the divergence verdict.

Default budgets per weight type: measured here on the tiny presets and the trained-like profile
(docs/verdict.md, "Quantized runs"); generous enough for an honest quantizer, tight enough that a weight
type an order coarser than the name says does not pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from parity.model.taps import layer_of

# mean KL (nats) of the next-token distribution a weight type may cost against the unquantized model
# (measured on the tiny presets, docs/verdict.md "Quantized runs": about 1.7x the worst correct run with the
# default weights, so a correct quantizer passes there; trained-like statistics at these widths cost far more)
DEFAULT_BUDGETS = {"f32": 0.0, "f16": 1e-4, "bf16": 1e-3, "q8_0": 5e-3, "int8": 5e-3, "q4_k": 0.15, "q4_0": 0.15,
                   "int4": 0.15}


def parse_budget(text: str) -> float | dict[str, float]:
    """`--quant-budget`: one mean-KL budget in nats for every weight type (`0.01`), or per weight type
    (`q4_0=0.05,q8_0=0.002`; the others keep their defaults)."""
    from parity.errors import ParityInputError

    def number(v: str, what: str) -> float:
        try:
            x = float(v)
        except ValueError:
            x = float("nan")
        if not math.isfinite(x) or x < 0:
            raise ParityInputError(f"{{option}} {what} {v!r} is not a mean KL in nats; give a number >= 0, e.g. "
                                   "0.05, or per weight type q4_0=0.05,q8_0=0.002", option="quant_budget")
        return x

    if "=" not in text:
        return number(text.strip(), "value")
    out = {}
    for part in text.split(","):
        key, _, v = part.partition("=")
        key = key.strip().lower()
        if key not in DEFAULT_BUDGETS:
            raise ParityInputError(f"{{option}} weight type {key!r} is not known; use one of "
                                   f"{', '.join(DEFAULT_BUDGETS)}", option="quant_budget")
        if key in out:
            raise ParityInputError(f"{{option}} gives {key} twice; give each weight type once", option="quant_budget")
        out[key] = number(v.strip(), key)
    return out


def default_budget(weight_type: str) -> float | None:
    key = weight_type.split()[0].lower()
    return DEFAULT_BUDGETS.get(key)


@dataclass(frozen=True)
class LayerLoss:
    layer: int | None  # None: the embedding, final norm and logits
    tap: str  # the layer's tap with the largest error
    stat: float  # that error, atol needed in units of each row's RMS


@dataclass(frozen=True)
class QuantLoss:
    impl: str
    dtype: str
    weight_type: str
    activations: str | None
    layers: tuple[LayerLoss, ...]
    kl_mean: float  # nats, over every prompt position; nan: the logits were not captured whole
    kl_max: float
    top1: float  # share of positions whose most likely token agrees
    positions: int
    budget: float | None  # mean KL allowed; None: no budget (reported only)

    @property
    def within(self) -> bool:
        return self.budget is None or (math.isfinite(self.kl_mean) and self.kl_mean <= self.budget)

    @property
    def label(self) -> str:
        return f"{self.impl}@{self.dtype}"

    def text(self) -> str:
        worst = max(self.layers, key=lambda x: x.stat, default=None)
        where = f"; worst layer tap {worst.tap} {worst.stat:.3g} x row RMS" if worst else ""
        budget = "" if self.budget is None else (f" {'within' if self.within else 'OVER'} budget {self.budget:g}")
        act = f", activations {self.activations}" if self.activations else ""
        return (f"{self.label} ({self.weight_type} weights{act}; judged against the reference on them) "
                f"quantization loss against the given weights: logits KL mean {self.kl_mean:.3g} max "
                f"{self.kl_max:.3g} nats, top-1 agreement {self.top1:.1%} of {self.positions} positions"
                f"{budget}{where}")

    def to_json(self) -> dict:
        return {"impl": self.impl, "dtype": self.dtype, "weight_type": self.weight_type,
                "activations": self.activations, "kl_mean": _num(self.kl_mean), "kl_max": _num(self.kl_max),
                "top1": self.top1, "positions": self.positions, "budget": self.budget, "within": self.within,
                "layers": [{"layer": x.layer, "tap": x.tap, "stat": _num(x.stat)} for x in self.layers]}


def _num(x: float):
    return x if math.isfinite(x) else None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def logits_loss(ref: np.ndarray, run: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(softmax(ref) || softmax(run)) in nats, and whether the argmax agrees. [T, V] each."""
    lp, lq = _log_softmax(ref), _log_softmax(run)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # [T]
    return np.maximum(kl, 0.0), ref.argmax(axis=-1) == run.argmax(axis=-1)


def _rows(tap) -> dict[int, np.ndarray]:
    """Position -> logits row, from a whole [T, V] array or a reduced tap's kept rows (real sizes)."""
    rows = getattr(tap, "row_index", None)
    if rows is not None:
        return {int(i): np.asarray(r) for i, r in zip(rows, tap.rows)}
    a = np.asarray(tap)
    return {i: a[i] for i in range(a.shape[0])}


def measure_loss(impl: str, dtype: str, weight_type: str, activations: str | None, results, refs: dict, traces,
                 budget: float | None) -> QuantLoss:
    """`results`: the run's cumulative TapResults against the UNquantized reference (table only); `refs`: the
    unquantized reference's traces by prompt; `traces`: the run's cumulative traces."""
    worst: dict = {}
    for r in results:
        if r.mode != "cumulative" or not math.isfinite(r.stat):
            continue
        key = layer_of(r.tap)
        if key not in worst or r.stat > worst[key].stat:
            worst[key] = LayerLoss(key, r.tap, r.stat)
    layers = tuple(sorted(worst.values(), key=lambda x: (x.layer is not None, x.layer or 0)))
    kls, agree = [], []
    for t in traces:
        if t.mode != "cumulative" or t.prompt not in refs:
            continue
        try:
            a, b = _rows(refs[t.prompt].taps["logits"]), _rows(t.taps["logits"])
        except KeyError:
            continue
        common = sorted(set(a) & set(b))  # positions held by both (every one, unless a trace is reduced)
        if not common:
            continue
        kl, top = logits_loss(np.stack([a[i] for i in common]), np.stack([b[i] for i in common]))
        kls.append(kl)
        agree.append(top)
    if kls:
        kl = np.concatenate(kls)
        top = np.concatenate(agree)
        kl_mean, kl_max, top1, n = float(kl.mean()), float(kl.max()), float(top.mean()), int(kl.size)
    else:
        kl_mean = kl_max = top1 = float("nan")
        n = 0
    return QuantLoss(impl, dtype, weight_type, activations, layers, kl_mean, kl_max, top1, n, budget)
