"""Compare a trace with the reference trace, tap by tap, in forward order.

Sees only `tap -> array` and metadata: no framework is imported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from parity.errors import ParityInputError
from parity.metrics import compare_arrays, logit_metrics
from parity.taps import layer_of
from parity.tolerances import TOLERANCES, Tolerance, growth
from parity.trace import Trace


@dataclass
class TapResult:
    impl: str
    dtype: str
    mode: str
    prompt: str
    tap: str
    layer: int | None
    max_abs: float
    max_rel: float
    atol: float  # absolute, as applied to this tap
    rtol: float
    passed: bool
    mismatched: int = 0
    numel: int = 0
    mismatch_fraction: float = 0.0
    max_ulp: float = 0.0
    cosine: float = 1.0
    ref_rms: float = 0.0
    where: list = field(default_factory=list)
    needed_atol: float = 0.0
    logits: dict | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        if d["logits"] is None:
            d.pop("logits")
        return d

    def message(self) -> str:
        """torch.testing's shape: how many failed, worst abs and rel and where, the tolerance, what would pass."""
        pct = 100.0 * self.mismatched / max(self.numel, 1)
        return (
            f"{self.impl}@{self.dtype} {self.mode} {self.tap} [{self.prompt}]: "
            f"{self.mismatched} / {self.numel} elements ({pct:.1f}%) beyond tolerance; "
            f"greatest absolute difference {self.max_abs:.3g} at index {tuple(self.where)} "
            f"(up to {self.atol:.3g} allowed), greatest relative difference {self.max_rel:.3g} "
            f"(up to {self.rtol:.3g} allowed); atol {self.needed_atol:.3g} with this rtol would have passed"
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
    ref: Trace, other: Trace, table: dict[str, Tolerance] | None = None, mode: str | None = None
) -> list[TapResult]:
    check_comparable(ref, other)
    table = table or TOLERANCES
    mode = mode or other.mode
    tol = table[other.dtype]
    n_layers = int(ref.spec["num_layers"])
    out = []
    for tap, actual in other.taps.items():
        if tap not in ref.taps:
            continue  # an extra tap the reference does not expose (attention internals)
        expected = ref.taps[tap]
        if actual.shape != expected.shape:
            # a shape mismatch is a divergence, not bad input: report it as a total failure
            out.append(TapResult(other.impl, other.dtype, mode, other.prompt, tap, layer_of(tap),
                                 float("inf"), float("inf"), 0.0, tol.rtol, False,
                                 numel=int(expected.size), mismatched=int(expected.size)))
            continue
        from parity.metrics import rms

        atol_abs = tol.atol * rms(expected) * growth(tap, n_layers, mode)
        m = compare_arrays(actual, expected, other.dtype, atol_abs, tol.rtol)
        r = TapResult(
            impl=other.impl, dtype=other.dtype, mode=mode, prompt=other.prompt, tap=tap, layer=layer_of(tap),
            max_abs=m["max_abs"], max_rel=m["max_rel"], atol=atol_abs, rtol=tol.rtol,
            passed=m["mismatched"] == 0 and m["finite"], mismatched=m["mismatched"], numel=m["numel"],
            mismatch_fraction=m["mismatch_fraction"], max_ulp=m["max_ulp"], cosine=m["cosine"],
            ref_rms=m["ref_rms"], where=m["where"], needed_atol=m["needed_atol"],
        )
        if tap == "logits":
            r.logits = logit_metrics(actual, expected)
        out.append(r)
    return out


def first_divergence(results: list[TapResult]) -> TapResult | None:
    """The first failing tap in forward order (results are already in forward order per run)."""
    for r in results:
        if not r.passed:
            return r
    return None
