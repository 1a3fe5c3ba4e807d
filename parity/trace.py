"""A trace: what one implementation computed at every tap, plus where it came from.

Saved as safetensors (tap -> array, metadata as JSON) so capture and
comparison can run in different processes or on different machines. Low
precision taps are stored widened to float32, which holds every bf16/fp16
value exactly; `dtype` records what they were.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.errors import ParityInputError


@dataclass
class Trace:
    impl: str
    version: str
    dtype: str
    spec: dict
    weights_hash: str
    tokens: list[int]
    prompt: str = "prompt"
    mode: str = "cumulative"
    taps: dict[str, np.ndarray] = field(default_factory=dict)  # forward order
    unavailable: dict[str, str] = field(default_factory=dict)  # tap -> why this impl cannot give it
    effective: dict = field(default_factory=dict)  # what the built model actually computes

    @property
    def label(self) -> str:
        return f"{self.impl}@{self.dtype}"

    def meta(self) -> dict:
        return {
            "impl": self.impl, "version": self.version, "dtype": self.dtype, "spec": self.spec,
            "weights_hash": self.weights_hash, "tokens": self.tokens, "prompt": self.prompt,
            "mode": self.mode, "order": list(self.taps), "unavailable": self.unavailable,
            "effective": self.effective,
        }

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(_widen(v)) for k, v in self.taps.items()}
        tmp = p.with_suffix(p.suffix + ".part")
        save_file(arrays, str(tmp), metadata={"parity_trace": json.dumps(self.meta())})
        tmp.replace(p)  # never leave a half-written trace under the real name
        return p


def _widen(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float64:
        return a
    return a.astype(np.float32)


def load_trace(path: str | Path) -> Trace:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ParityInputError(f"trace {str(p)!r} does not exist; give a file written by parity capture")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["parity_trace"])
            taps = {k: f.get_tensor(k) for k in meta["order"]}
    except (KeyError, json.JSONDecodeError):
        raise ParityInputError(f"{p}: a safetensors file but not a parity trace (no parity_trace metadata)") from None
    except Exception as e:
        raise ParityInputError(f"{p}: not a readable trace ({e}); capture it again") from None
    order = meta.pop("order")
    t = Trace(**meta)
    t.taps = {k: taps[k] for k in order}
    return t
