"""PyTorch set-up shared by the torch adapters: dtype names and thread count."""

from __future__ import annotations

import os

_configured = False


def torch_dtype(name: str):
    import torch

    configure()
    return {"float64": torch.float64, "float32": torch.float32,
            "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def configure() -> None:
    """One intra-op thread unless PARITY_THREADS says otherwise.

    Measured on the 2-core CI machines: tiny models ran many times faster on
    one thread than on two (thread hand-off dominates matmuls this small).
    """
    global _configured
    if _configured:
        return
    import torch

    torch.set_num_threads(int(os.environ.get("PARITY_THREADS", "1")))
    _configured = True
