"""Per-dtype tables: the fixed tolerance (the verdict's floor), the noise margin, the float formats.

The verdict (parity.compare.pairs) lets a tap pass when the atol it needs, in units
of each row's RMS (parity.numerics.metrics.excess, with the rtol below), is within

    bound = max(atol * growth, NOISE_MARGIN * honest noise)

so a tap fails only beyond both this table and what correct implementations
err at the same tap in the same run (parity.compare.noise). In cumulative mode
rounding error compounds through the layers, so the table's `growth =
sqrt(1 + depth)` (depth 0 at the embedding, i + 1 at layer i, num_layers + 1 at
the final norm and logits); in isolated mode each sub-layer starts from the
reference's input and growth is 1. Where there are no honest runs (traces
compared from elsewhere) the table alone decides.

How the table's numbers were chosen (measured with `python
bench/tolerance_margin.py`, which re-measures both sides): correct
implementations (the port and HF, three seeds, a 64-token prompt, tiny-gemma
and a 12-layer hidden-320 spec) needed at most the "honest" figure below; each
tolerance sits 2-10x above it, and the smallest injected real fault the dtype
can show at all sits at least 5x above the tolerance.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from parity.errors import ParityInputError


@dataclass(frozen=True)
class Tolerance:
    atol: float  # in units of each row's RMS of the reference tap (times the depth growth in cumulative mode)
    rtol: float
    reason: str


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(
        1e-9, 1e-9,
        "every op in float64 agrees to ~1e-13; anything above 1e-9 means some op ran in lower "
        "precision (HF's RMSNorm calls .float() and so downcasts a float64 model)",
    ),
    "float32": Tolerance(
        5e-5, 1e-5,
        "honest fp32 error is at most 1.2e-5 RMS after 12 layers (3.5e-6 at layer 0); the "
        "exact-vs-tanh GELU swap is 8e-4 RMS at layers.0.mlp.act, 11x the layer-0 limit of 7e-5",
    ),
    "bfloat16": Tolerance(
        0.15, 1.6e-2,
        "rtol is torch.testing's bf16 default (two ulps); honest bf16 error is 0.054 RMS at "
        "layer 0 and 0.28 RMS at layer 10 (limits 0.21 and 0.52); structural faults (swapped "
        "GeGLU, sandwich norms, missing (1 + w), missing embedding scale) are O(1) RMS. Faults "
        "below one bf16 ulp (exact GELU) are left to the probes, not to this tolerance",
    ),
    "float16": Tolerance(
        0.02, 2e-3,
        "honest fp16 error is 0.0054 RMS at layer 0 and 0.033 RMS at layer 10 (limits 0.028 "
        "and 0.069); rtol two fp16 ulps",
    ),
}


# A tap is beyond honest noise when the atol it needs (in units of each row's RMS, parity.numerics.metrics.excess)
# exceeds NOISE_MARGIN times the largest that any member of the honest ensemble (parity.compare.noise) needs at
# the same tap, on the same weights and tokens, in the same dtype and mode, and also exceeds the table
# above (the floor: errors far below any fault never count). See parity/compare/noise.py for the measurements.
NOISE_MARGIN = 4.0


@dataclass(frozen=True)
class Format:
    """What a floating-point dtype can carry: explicit mantissa bits and the smallest normal exponent."""

    mantissa_bits: int
    min_exponent: int

    @property
    def smallest_normal(self) -> float:
        return 2.0**self.min_exponent

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def unit_roundoff(self) -> float:
        return 2.0 ** -(self.mantissa_bits + 1)


FORMATS: dict[str, Format] = {
    "float64": Format(52, -1022), "float32": Format(23, -126), "bfloat16": Format(7, -126), "float16": Format(10, -14),
}

# The lm-head probe's closeness, in units of the logits' RMS: a head matmul in low precision accumulates in
# another order than the float64 candidate, so it is judged by closeness, not bits.
LM_HEAD_CLOSENESS = {"float64": 1e-9, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}


# The parity suite's next-token check (parity/test_logits.py): mean KL(reference || run) in nats. bf16
# random-weight logits stay below 1e-3; a structural fault is above 1e-2.
LOGITS_KL_MAX = {"float64": 1e-12, "float32": 1e-8, "bfloat16": 2e-3, "float16": 1e-4}


def depth_of(tap: str, num_layers: int) -> int:
    if tap == "embed" or tap.startswith("rope."):
        return 0
    if tap.startswith("layers."):
        return int(tap.split(".")[1]) + 1
    return num_layers + 1


def growth(tap: str, num_layers: int, mode: str) -> float:
    return 1.0 if mode == "isolated" else math.sqrt(1 + depth_of(tap, num_layers))


def load_overrides(pyproject: str | Path | None = None) -> dict[str, Tolerance]:
    """The table, with `[tool.parity.tolerances.<dtype>]` atol/rtol from pyproject.toml applied.

    atol and rtol must be given together (as torch.testing insists): one
    without the other silently keeps half of an unrelated default.
    """
    table = dict(TOLERANCES)
    path = Path(pyproject) if pyproject else _find_pyproject()
    if path is None or not path.is_file():
        return table
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ParityInputError(f"{path}: not valid TOML ({e}); fix the file") from None
    over = data.get("tool", {}).get("parity", {}).get("tolerances", {})
    for dtype, entry in over.items():
        if dtype not in table:
            raise ParityInputError(
                f"{path}: [tool.parity.tolerances.{dtype}] is not a dtype; use one of {sorted(table)}"
            )
        if set(entry) - {"atol", "rtol", "reason"} or not {"atol", "rtol"} <= set(entry):
            raise ParityInputError(
                f"{path}: [tool.parity.tolerances.{dtype}] must give atol and rtol together "
                f"(and optionally reason); got {sorted(entry)}"
            )
        a, r = entry["atol"], entry["rtol"]
        if not all(isinstance(v, (int, float)) and v >= 0 for v in (a, r)):
            raise ParityInputError(f"{path}: tolerances for {dtype} must be non-negative numbers, got {a!r}, {r!r}")
        table[dtype] = Tolerance(float(a), float(r), entry.get("reason", f"overridden in {path.name}"))
    return table


def _find_pyproject() -> Path | None:
    for d in [Path.cwd(), *Path.cwd().parents]:
        p = d / "pyproject.toml"
        if p.is_file():
            return p
    return None
