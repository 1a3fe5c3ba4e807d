"""The one canonical weight set every implementation is built from.

HuggingFace names are the lingua franca. Random weights are seeded per tensor
(so adding a tensor does not reshuffle the others), drawn at a scale that
drives every non-linearity into its curved region (std 1/sqrt(fan_in), not
0.02: at 0.02 exact and tanh GELU differ by ~1e-6 and hide in fp32 noise),
with RMSNorm weights away from zero (at zero a missing `(1 + w)` is
invisible), and rounded to bfloat16-representable values so that every dtype
starts from the same numbers and the measured error is the computation's.
That is the default profile; the `trained-like` profile (parity.model.weight_profiles)
has the statistics of released checkpoints instead: heavy-tailed norm weights,
a massive activation on BOS and an attention sink.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.model.canonical import canonical_shapes  # noqa: F401 -- its home is parity.model.canonical
from parity.errors import ParityInputError
from parity.model.spec import GemmaSpec
from parity.model.tensor_file import StoredTensors, write_safetensors


def _round_bf16(a: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


_NORM = re.compile(r"norm(_\d+)?\.weight$")  # RMSNorm weights (Gemma 4's MoE adds post_feedforward_layernorm_1, ...)


def random_tensor(name: str, shape: tuple[int, ...], seed: int, spec: GemmaSpec | None = None) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if spec is not None and spec.family == 4:
        special = _gemma4_tensor(name, shape, rng, spec)
        if special is not None:
            return _round_bf16(special.astype(np.float32))
    if _NORM.search(name):
        # |w| in [0.1, 0.6]: (1 + w) in [0.4, 1.6], never the identity
        mag = rng.uniform(0.1, 0.6, size=shape)
        w = mag * rng.choice([-1.0, 1.0], size=shape)
    elif "embed_tokens" in name or name == "lm_head.weight":
        # after the sqrt(hidden) scale the residual stream starts at unit RMS
        w = rng.standard_normal(shape) / math.sqrt(shape[1])
    else:
        w = rng.standard_normal(shape) / math.sqrt(shape[1])  # fan_in is the last dim
    return _round_bf16(w.astype(np.float32))


def _gemma4_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator, spec: GemmaSpec) -> np.ndarray | None:
    """Gemma 4's draws where they differ from the default (None: the default draw).

    Norm weights are used as they are (no unit offset), so they sit around 1, never at it: w in 1 +- [0.1, 0.6]
    (a `(1 + w)` fault then scales by 1.4..2.6, visible). The layer scalar, the router's scale and its per-expert
    scale likewise sit at 1 +- [0.1, 0.5] (HF initialises all of them to exactly 1, where dropping one cannot
    show). Matrices: `matrix_divisor`.
    """
    def around_one(lo: float, hi: float) -> np.ndarray:
        return 1.0 + rng.uniform(lo, hi, size=shape) * rng.choice([-1.0, 1.0], size=shape)

    if _NORM.search(name) and not spec.norm_unit_offset or name.endswith("router.scale"):
        return around_one(0.1, 0.6)
    if name.endswith(("layer_scalar", "router.per_expert_scale")):
        return around_one(0.1, 0.5)
    if len(shape) >= 2:
        return rng.standard_normal(shape) / matrix_divisor(name, shape, spec)
    return None


PLE_TABLE = "model.embed_tokens_per_layer.weight"
PLE_PROJECTION = "model.per_layer_model_projection.weight"


def matrix_divisor(name: str, shape: tuple[int, ...], spec: GemmaSpec) -> float:
    """A matrix is standard normal / this (weight_store streams the same draw a block of rows at a time).

    sqrt(fan_in) (the last dim, 3-D expert banks included), except: the router projection, drawn so the logits
    over the experts spread by about 1.5 (its input has unit norm), so the top-k choice has margins rather than
    near-ties everywhere; and the per-layer embedding table, at unit RMS after its sqrt(ple_dim) scale.
    """
    if spec.family == 4 and name.endswith("router.proj.weight"):
        return 1 / 1.5
    if spec.family == 4 and name == PLE_TABLE:
        return math.sqrt(spec.ple_dim)
    return math.sqrt(shape[-1])


def param_count(spec: GemmaSpec) -> int:
    return sum(math.prod(s) for s in canonical_shapes(spec).values())


@dataclass(frozen=True)
class Checkpoint:
    """The directory the weights were read from, for a library that loads it its own way (keras-hub's
    `from_preset`): `layout` "hf" (config.json + safetensors) or "keras-hub" (a saved preset)."""

    directory: str
    layout: str


@dataclass
class Weights:
    """The canonical tensors: in memory (a dict) or in a file (`tensor_file.StoredTensors`).

    Adapters fill their parameters through `read_into`, which works for both
    and never holds a second full copy of a stored tensor.
    """

    spec: GemmaSpec
    tensors: Mapping[str, np.ndarray]
    source: str = "random"
    _hash: str | None = field(default=None, repr=False, compare=False)
    # generated by this parity into its own cache (parity.model.weight_store): finite by construction, so the
    # NaN scan is skipped. Set by the generator only: a file's metadata claiming so is never trusted.
    generated: bool = field(default=False, repr=False, compare=False)
    # a checkpoint directory these weights are the whole of (None: generated, a file, or a truncated depth)
    checkpoint: Checkpoint | None = field(default=None, compare=False)

    @property
    def stored(self) -> bool:
        return hasattr(self.tensors, "read_into")

    @property
    def hash(self) -> str:
        if not self.stored:
            return self._compute_hash()  # a dict can be edited in place (fault tests do): never cached
        if self._hash is None:
            self._hash = self.tensors.metadata.get("weights_hash") or self._compute_hash()
        return self._hash

    def _compute_hash(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.tensors):
            h.update(k.encode())
            if self.stored:  # float32 blocks, the same bytes as the in-memory arrays
                h.update(b"float32")
                for _, block in self.tensors.blocks(k):
                    h.update(np.ascontiguousarray(block).tobytes())
                continue
            t = np.ascontiguousarray(self.tensors[k])
            h.update(str(t.dtype).encode())
            h.update(t.tobytes())
        return h.hexdigest()[:16]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors.shape(name) if self.stored else tuple(self.tensors[name].shape)

    def read_into(self, name: str, out: np.ndarray, row0: int = 0) -> None:
        """Fill `out` (any float dtype, ml_dtypes.bfloat16 included) with rows row0.. of `name`."""
        if self.stored:
            self.tensors.read_into(name, out, row0)
        else:
            out[...] = self.tensors[name][row0:row0 + (out.shape[0] if out.ndim else 1)]

    def rows(self, name: str, ids) -> np.ndarray:
        """float32 rows `ids` of a matrix (an embedding lookup) without reading the rest."""
        if self.stored:
            return self.tensors.rows(name, ids)
        return np.asarray(self.tensors[name])[np.asarray(list(ids), dtype=np.int64)]

    def check(self) -> None:
        """Every tensor the spec needs is here, with its shape, finite, and nothing else."""
        check_tensors(self.spec, self.tensors, where=self.source, generated=self.generated)

    def truncated(self, spec: GemmaSpec) -> "Weights":
        """The tensors of `spec`, a shallower version of this spec (its first layers), nothing copied.

        A stored subset's hash is derived from the whole file's and the depth
        rather than read, so every process agrees on it without a pass over it.
        Gemma 4's per-layer embedding table and its projection hold every layer's
        slice side by side ([rows, L * P] and [L * P, D]): the first n layers' are
        the first n * P columns and rows (what layer i reads is `ple[.., i, :]`).
        """
        from parity.model.spec import truncate

        if spec.num_layers > self.spec.num_layers or truncate(self.spec, spec.num_layers).replace(
                name=spec.name) != spec:
            raise ParityInputError(f"spec {spec.name!r} is not a truncation of {self.spec.name!r}")
        names = list(canonical_shapes(spec))
        cut = spec.num_layers * spec.ple_dim  # PLE columns (table) and rows (projection) of the first layers
        whole = self.checkpoint if spec.num_layers == self.spec.num_layers else None  # a library loads it whole
        if self.stored:
            h = hashlib.sha256(f"{self.hash}/first {spec.num_layers} layers".encode()).hexdigest()[:16]
            meta = {**self.tensors.metadata, "weights_hash": h, "spec": json.dumps(spec.to_dict())}
            ple = spec.ple_dim and spec.num_layers < self.spec.num_layers
            sub = self.tensors.subset(names, meta, {PLE_TABLE: cut} if ple else None,
                                      {PLE_PROJECTION: cut} if ple else None)
            return Weights(spec, sub, source=self.source, generated=self.generated, checkpoint=whole)
        out = {k: self.tensors[k] for k in names}
        if spec.ple_dim:
            out[PLE_TABLE] = self.tensors[PLE_TABLE][:, :cut]
            out[PLE_PROJECTION] = self.tensors[PLE_PROJECTION][:cut]
        return Weights(spec, out, source=self.source, checkpoint=whole)


def check_tensors(spec: GemmaSpec, tensors: Mapping[str, np.ndarray], where: str, generated: bool = False) -> None:
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
    stored = hasattr(tensors, "read_into")
    for k, shape in want.items():
        got = tuple(tensors.shape(k) if stored else tensors[k].shape)
        if got != shape:
            raise ParityInputError(
                f"{where}: tensor {k!r} has shape {got}, the spec needs {shape}; the weights and spec disagree"
            )
    if stored and generated:
        return  # generated here, finite by construction; scanning 10 GB would cost a minute
    for k in want:
        blocks = tensors.blocks(k) if stored else [(0, tensors[k])]
        n = sum(int((~np.isfinite(b)).sum()) for _, b in blocks)
        if n:
            raise ParityInputError(
                f"{where}: tensor {k!r} holds {n} NaN/inf value(s); the checkpoint is corrupt, re-export it"
            )


PROFILES = ("default", "trained-like")  # statistics of the seeded random weights (see parity.model.weight_profiles)


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ParityInputError(f"weights profile {profile!r} is not a profile; use one of {', '.join(PROFILES)}")
    return profile


def random_source(seed: int, profile: str = "default") -> str:
    """The `source` of seeded random weights: the profile is named unless it is the default."""
    return f"random(seed={seed})" if profile == "default" else f"random(seed={seed}, profile={profile})"


def random_weights(spec: GemmaSpec, seed: int = 0, profile: str = "default") -> Weights:
    """Seeded random weights: `default` (1/sqrt(fan_in), |w| in [0.1, 0.6] norms) or `trained-like`
    (heavy-tailed norm weights, a massive BOS activation, an attention sink: `parity.model.weight_profiles`)."""
    if check_profile(profile) == "default":
        tensors = {name: random_tensor(name, shape, seed, spec) for name, shape in canonical_shapes(spec).items()}
    else:
        from parity.model.weight_profiles import trained_like

        tensors = trained_like(spec, seed)
    return Weights(spec, tensors, source=random_source(seed, profile))


def save_weights(w: Weights, path: str | Path) -> Path:
    p = Path(path)
    if w.stored:  # already a file: copied byte for byte, its bfloat16 bits as they are
        import shutil

        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(w.tensors.path, p)
        return p
    arrays = {k: np.asarray(v) for k, v in sorted(w.tensors.items())}
    entries = [(k, a.shape, a.dtype, lambda a=a: a) for k, a in arrays.items()]
    meta = {"spec": json.dumps(w.spec.to_dict()), "source": w.source}
    if w.checkpoint is not None:  # a capture process hands the directory on to a library that loads it itself
        meta["checkpoint"] = json.dumps({"directory": w.checkpoint.directory, "layout": w.checkpoint.layout})
    return write_safetensors(p, entries, meta)


def load_weights(path: str | Path, spec: GemmaSpec | None = None) -> Weights:
    """Canonical weights from a safetensors file (written by `save_weights` or any file in HF names).

    Nothing is read but the header until an adapter asks for a tensor: the
    file may be larger than memory allows twice.
    """
    p = Path(path)
    if not p.is_file():
        raise ParityInputError(f"weights file {str(p)!r} does not exist; give an existing .safetensors path")
    tensors = StoredTensors(p)
    if spec is None:
        if "spec" not in tensors.metadata:
            raise ParityInputError(f"{p}: has no spec in its metadata; pass --spec with the matching config")
        spec = GemmaSpec.from_dict(json.loads(tensors.metadata["spec"]))
    w = Weights(spec, tensors, source=tensors.metadata.get("source") if tensors.metadata.get("generator") else str(p))
    if "checkpoint" in tensors.metadata:  # save_weights of a checkpoint's weights (a capture process's input)
        try:
            c = json.loads(tensors.metadata["checkpoint"])
            w.checkpoint = Checkpoint(str(c["directory"]), str(c["layout"]))
            w.source = tensors.metadata.get("source", w.source)
        except (ValueError, KeyError, TypeError):
            raise ParityInputError(f"{p}: its 'checkpoint' metadata is not {{directory, layout}}; re-save the "
                                   "weights") from None
    w.check()
    return w


# ------------------------------------------------------------------ filling
@dataclass(frozen=True)
class Part:
    """What one target tensor is made of: row ranges of canonical tensors, stacked in order.

    Adapters plan with Parts (which `map_weights` checks by shape like
    arrays) and then `fill` their own parameter buffers from them, so a
    stored tensor is never materialised a second time.
    """

    shape: tuple[int, ...]
    pieces: tuple[tuple[str, int, int], ...]  # (canonical name, first row, row count)


def parts(weights: Weights) -> dict[str, Part]:
    out = {}
    for k in weights.tensors:
        shape = weights.shape(k)
        out[k] = Part(shape, ((k, 0, shape[0]),))
    return out


def fill(weights: Weights, part: Part, out: np.ndarray) -> np.ndarray:
    """Write `part` into `out` (shape part.shape, any float dtype) a row block at a time."""
    if tuple(out.shape) != part.shape:
        raise ValueError(f"buffer {tuple(out.shape)} does not match {part.shape}")
    row = 0
    for name, row0, n in part.pieces:
        weights.read_into(name, out[row:row + n], row0)
        row += n
    return out


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
