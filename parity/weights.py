"""The one canonical weight set every implementation is built from.

HuggingFace names are the lingua franca. Random weights are seeded per tensor
(so adding a tensor does not reshuffle the others), drawn at a scale that
drives every non-linearity into its curved region (std 1/sqrt(fan_in), not
0.02: at 0.02 exact and tanh GELU differ by ~1e-6 and hide in fp32 noise),
with RMSNorm weights away from zero (at zero a missing `(1 + w)` is
invisible), and rounded to bfloat16-representable values so that every dtype
starts from the same numbers and the measured error is the computation's.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parity.errors import ParityInputError
from parity.spec import GemmaSpec


def canonical_shapes(spec: GemmaSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name and its shape, in HF naming for the spec's norm layout."""
    h, i, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if spec.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        if spec.norm_placement == "sandwich":
            # Gemma 2/3 naming: post_attention_layernorm is AFTER attention
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        else:
            # Gemma 1 naming: post_attention_layernorm is the PRE-MLP norm
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not spec.tied_head:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def _round_bf16(a: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if name.endswith("norm.weight"):
        # |w| in [0.1, 0.6]: (1 + w) in [0.4, 1.6], never the identity
        mag = rng.uniform(0.1, 0.6, size=shape)
        w = mag * rng.choice([-1.0, 1.0], size=shape)
    elif "embed_tokens" in name or name == "lm_head.weight":
        # after the sqrt(hidden) scale the residual stream starts at unit RMS
        w = rng.standard_normal(shape) / math.sqrt(shape[1])
    else:
        w = rng.standard_normal(shape) / math.sqrt(shape[1])  # fan_in is the last dim
    return _round_bf16(w.astype(np.float32))


@dataclass
class Weights:
    spec: GemmaSpec
    tensors: dict[str, np.ndarray]
    source: str = "random"

    @property
    def hash(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.tensors):
            t = np.ascontiguousarray(self.tensors[k])
            h.update(k.encode())
            h.update(str(t.dtype).encode())
            h.update(t.tobytes())
        return h.hexdigest()[:16]

    def check(self) -> None:
        """Every tensor the spec needs is here, with its shape, finite, and nothing else."""
        check_tensors(self.spec, self.tensors, where=self.source)


def check_tensors(spec: GemmaSpec, tensors: dict[str, np.ndarray], where: str) -> None:
    want = canonical_shapes(spec)
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ParityInputError(
            f"{where}: {len(missing)} tensor(s) the spec needs are missing, first {missing[0]!r}; "
            "the weights do not match the spec (wrong config.json or truncated checkpoint)"
        )
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise ParityInputError(
            f"{where}: {len(extra)} tensor(s) the spec does not use, first {extra[0]!r}; "
            "the weights do not match the spec (check num_layers, tied_head and norm placement)"
        )
    for k, shape in want.items():
        got = tuple(tensors[k].shape)
        if got != shape:
            raise ParityInputError(
                f"{where}: tensor {k!r} has shape {got}, the spec needs {shape}; the weights and spec disagree"
            )
        if not np.isfinite(tensors[k]).all():
            n = int((~np.isfinite(tensors[k])).sum())
            raise ParityInputError(
                f"{where}: tensor {k!r} holds {n} NaN/inf value(s); the checkpoint is corrupt, re-export it"
            )


def random_weights(spec: GemmaSpec, seed: int = 0) -> Weights:
    tensors = {name: random_tensor(name, shape, seed) for name, shape in canonical_shapes(spec).items()}
    return Weights(spec, tensors, source=f"random(seed={seed})")


def save_weights(w: Weights, path: str | Path) -> Path:
    from safetensors.numpy import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    import json

    save_file(w.tensors, str(p), metadata={"spec": json.dumps(w.spec.to_dict()), "source": w.source})
    return p


def load_weights(path: str | Path, spec: GemmaSpec | None = None) -> Weights:
    """Load safetensors written by `save_weights` (or any file in canonical HF names)."""
    import json

    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ParityInputError(f"weights file {str(p)!r} does not exist; give an existing .safetensors path")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ParityInputError(f"{p}: not a readable safetensors file ({e}); re-export it") from None
    if spec is None:
        if "spec" not in meta:
            raise ParityInputError(f"{p}: has no spec in its metadata; pass --spec with the matching config")
        spec = GemmaSpec.from_dict(json.loads(meta["spec"]))
    w = Weights(spec, tensors, source=str(p))
    w.check()
    return w


# ------------------------------------------------------------------ name maps
_LAYER = re.compile(r"\.(\d+)\.")


def map_weights(
    tensors: dict[str, np.ndarray],
    name_map: dict[str, str],
    target_shapes: dict[str, tuple[int, ...]],
    where: str,
) -> dict[str, np.ndarray]:
    """Rename canonical tensors through a literal map with a `{}` layer placeholder.

    Checks that every canonical tensor is used exactly once, that every target
    parameter is filled exactly once, and that every shape matches. A value of
    None in the map means "this canonical tensor is deliberately not loaded"
    (for example a tied head) and must be explained by the adapter.
    """
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for name, t in tensors.items():
        m = _LAYER.search(name)
        key = _LAYER.sub(".{}.", name, count=1) if m else name
        if key not in name_map:
            raise ParityInputError(f"{where}: canonical tensor {name!r} has no entry in the name map; add it")
        target = name_map[key]
        used.add(name)
        if target is None:
            continue
        target = target.format(m.group(1)) if m else target
        if target in out:
            raise ParityInputError(f"{where}: two canonical tensors map to {target!r}; fix the name map")
        if target not in target_shapes:
            raise ParityInputError(f"{where}: name map sends {name!r} to {target!r}, which the model does not have")
        if tuple(t.shape) != tuple(target_shapes[target]):
            raise ParityInputError(
                f"{where}: {name!r} has shape {tuple(t.shape)} but {target!r} needs {tuple(target_shapes[target])}"
            )
        out[target] = t
    unfilled = sorted(set(target_shapes) - set(out))
    if unfilled:
        raise ParityInputError(
            f"{where}: {len(unfilled)} model parameter(s) got no weight, first {unfilled[0]!r}; fix the name map"
        )
    return out
