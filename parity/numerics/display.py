"""How a number is written for people: the one float format and the one share-of-bound format.

Every view (terminal, report.md, report.html, the pytest summary) and every sentence the diagnosis writes
use these two, so the same number reads the same everywhere. report.json keeps the numbers themselves.
"""

from __future__ import annotations

import math


def number(x, spec: str = ".3g") -> str:
    """A number as text: `spec` for a float (three significant digits unless a metric declares its own),
    `inf`, `-inf` and `nan` spelled so, ints as they are, `-` for None (nothing measured)."""
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return format(x, spec) if isinstance(x, float) else str(x)


def share_text(x: float) -> str:
    """A share of a bound (parity.compare.pairs.share), the one way it is written: `0.25x`, `3.1x`, `1.2e+05x`,
    `inf`. Named for what it writes: `pairs.share` computes the share itself."""
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2g}x" if x < 1000 else f"{x:.1e}x"
