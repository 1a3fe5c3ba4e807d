"""What the probes of one run share beyond its trace: how its matmuls round their inputs (a quantized run)."""

from __future__ import annotations

from contextvars import ContextVar

import numpy as np

# the run's activation rounding (parity.numerics.act_quant) while its probes run: set by run_probes
MATMUL_INPUT: ContextVar[str | None] = ContextVar("parity_probe_matmul_input", default=None)


def matmul_input(x) -> np.ndarray:
    """A captured tap as the run's matmuls read it: rounded as a quantized run's kernels round activations,
    as is otherwise; float64 either way."""
    kind = MATMUL_INPUT.get()
    if not kind:
        return np.asarray(x, np.float64)
    from parity.numerics.act_quant import round_rows

    return round_rows(np.asarray(x, np.float32), kind).astype(np.float64)
