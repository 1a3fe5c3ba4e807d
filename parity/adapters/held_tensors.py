"""A runtime's held weights as a Mapping that dequantizes one tensor when asked (parity.adapters.base.Held).

A quantizing runtime's file (llama.cpp's GGUF, onnxruntime-genai's ONNX initializers) holds codes and scales; the
float32 tensors they stand for are four to eight times larger. Made one at a time and never kept, a real-size
model's held weights cost one tensor's memory (the 256k-row embedding at most), not the whole model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np


class HeldTensors(Mapping):
    """canonical name -> float32 array, `load(name)` called on each access; nothing is cached, so each access
    dequantizes again (a caller that needs a tensor twice keeps it)."""

    def __init__(self, load: Callable[[str], np.ndarray], names: Iterable[str]) -> None:
        self._load = load
        self._names = tuple(names)
        self._known = frozenset(self._names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._known
