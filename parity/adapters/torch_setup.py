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

    torch.set_num_threads(threads())
    _configured = True


def threads() -> int:
    """PARITY_THREADS as a thread count; checked by the harness before any work (bad input, exit 2).

    Bounded by four times the machine's cores: more oversubscribes every core for no gain, and a count
    like 100000 makes torch's thread pool fail to start (a segfault, not an error).
    """
    from parity.errors import ParityInputError

    text = os.environ.get("PARITY_THREADS", "1")
    most = 4 * (os.cpu_count() or 1)
    n = int(text.strip()) if text.strip().isdigit() and text.strip().isascii() else 0
    if not 1 <= n <= most:
        raise ParityInputError(f"PARITY_THREADS={text!r} is not a positive thread count up to {most} (four times this "
                               f"machine's {os.cpu_count() or 1} cores); set it to 1 (the default, fastest for tiny "
                               "models) or up to the core count")
    return n


def stream_layers(weight_bytes: int) -> bool:
    """Whether to hold one layer's weights at a time (PARITY_STREAM: auto, always, never).

    auto streams when the model's weights would take more than 80% of the
    memory available now: a float64 reference of a Gemma-2B shape (20 GB)
    streams on a 24 GB machine, its bfloat16 and float32 runs do not.
    """
    how = os.environ.get("PARITY_STREAM", "auto")
    if how not in ("auto", "always", "never"):
        from parity.errors import ParityInputError

        raise ParityInputError(f"PARITY_STREAM={how!r}; use auto, always or never")
    if how != "auto":
        return how == "always"
    return weight_bytes > 0.8 * available_memory()


def available_memory() -> int:
    from parity.model.resources import available_memory as available

    got = available()
    return (1 << 62) if got is None else got  # unknown: never stream on a guess
