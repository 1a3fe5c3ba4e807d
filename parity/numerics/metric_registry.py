"""The metric registry: every per-tap number beyond the verdict's, declared once and shown everywhere.

A metric is one function `(actual, reference) -> float` on two float64 arrays of the same shape (a tap as
compared: the whole tensor, or the rows both sides hold of a reduced tap) and a declaration: its name (its key
in report.json's `taps[i].metrics`), unit, format, which direction is worse and a one-line description.
The comparison (parity.compare.pairs) computes every registered metric for every tap it compares; report.json
writes them per tap and declares them once under `metrics`; the terminal, report.md, report.html and the pytest
summary (parity.report.summary) show each run's worst value of each. Adding one is one registration:

    from parity.numerics.metric_registry import metric

    @metric("max_ulp16", unit="ulp", fmt=".0f", worse="higher", description="...")
    def max_ulp16(actual, reference) -> float: ...

Metrics describe; they never decide. The verdict's one statistic stays `TapResult.stat`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from parity.numerics.display import number
from parity.numerics.metrics import error_percentile, sqnr_db

WORSE = ("higher", "lower")  # which direction of a metric is worse


@dataclass(frozen=True)
class Metric:
    name: str  # the key in report.json and the column in every view
    fn: Callable[[np.ndarray, np.ndarray], float]  # (actual, reference) -> the number
    unit: str = ""  # shown in the column's header
    fmt: str = ".3g"  # a format spec for parity.numerics.display.number
    worse: str = "higher"  # "higher": a larger value is worse (an error); "lower": a smaller one is (a SNR)
    description: str = ""

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"metric name {self.name!r} is not an identifier; name it like `err_p99` (it is a "
                             "key in report.json and a column header)")
        if self.worse not in WORSE:
            raise ValueError(f"metric {self.name}: worse={self.worse!r}, expected one of {WORSE}")
        format(1.0, self.fmt)  # a bad format spec fails here, at registration, not in a renderer

    @property
    def header(self) -> str:
        return f"{self.name} ({self.unit})" if self.unit else self.name

    def text(self, x: float | None) -> str:
        """The value as every view writes it (the unit is in the header)."""
        return number(None if x is None else float(x), self.fmt)

    def worst(self, values) -> float | None:
        """The worst of several values (None if there are none; NaN is no value)."""
        xs = [float(v) for v in values if v is not None and not math.isnan(v)]
        if not xs:
            return None
        return max(xs) if self.worse == "higher" else min(xs)


METRICS: dict[str, Metric] = {}  # name -> Metric, in registration order (the order of the columns)


def register(m: Metric) -> Metric:
    if m.name in METRICS:
        raise ValueError(f"a metric named {m.name!r} is already registered ({METRICS[m.name].description!r}); "
                         "choose another name or unregister it first")
    METRICS[m.name] = m
    return m


def unregister(name: str) -> Metric:
    return METRICS.pop(name)


def metric(name: str, **declaration) -> Callable:
    """Decorator: register `fn` as metric `name` with its declaration (unit, fmt, worse, description)."""
    def add(fn):
        register(Metric(name, fn, **declaration))
        return fn
    return add


def compute(actual: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Every registered metric of one pair, by name."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    return {name: float(m.fn(a, r)) for name, m in METRICS.items()}


register(Metric("sqnr", sqnr_db, unit="dB", fmt=".1f", worse="lower",
                description="signal to noise: 10 log10(sum r^2 / sum (a - r)^2); inf when equal"))
register(Metric("err_p50", partial(error_percentile, q=50), unit="x row RMS", worse="higher",
                description="median of |a - r| / the RMS of r's row"))
register(Metric("err_p99", partial(error_percentile, q=99), unit="x row RMS", worse="higher",
                description="99th percentile of |a - r| / the RMS of r's row"))
