"""The interface every implementation adapter has, and the result it returns.

An adapter builds one implementation from a spec and the canonical weights in
one dtype, runs tokens through the library's own forward pass, and records
what the library computes at each canonical tap. It imports its framework
inside its methods, so the rest of parity works without it; no adapter
imports another, and nothing outside adapters imports a framework.

Isolated mode: `run(..., feed=...)` maps a tap name to an array that replaces
the *input* of the sub-module producing that tap (the reference's input), so
the tap's error is local to that sub-module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity.spec import GemmaSpec
from parity.weights import Weights

DTYPES = ("float64", "float32", "bfloat16", "float16")


@dataclass
class RunResult:
    taps: dict[str, np.ndarray]  # canonical tap -> [T, ...] array (batch dimension dropped)
    unavailable: dict[str, str] = field(default_factory=dict)  # tap -> why it cannot be captured


class Adapter:
    """Subclass this (or duck-type it) to add an implementation of your own."""

    name: str = "?"
    #: taps this implementation can never give, with the reason
    cannot: dict[str, str] = {}

    def version(self) -> str:
        raise NotImplementedError

    def check(self, spec: GemmaSpec, dtype: str) -> None:
        """Raise ParityInputError (BackendMissing if not installed) when it cannot run this spec/dtype."""

    def build(self, spec: GemmaSpec, weights: Weights, dtype: str) -> Any:
        raise NotImplementedError

    def run(self, model: Any, tokens: list[int], feed: dict[str, np.ndarray] | None = None) -> RunResult:
        raise NotImplementedError

    def effective(self, model: Any) -> dict:
        """What the built model will actually compute, read from the model, not the config."""
        return {}

    def release(self, model: Any) -> None:
        """Free the model's memory before the next implementation is built."""
