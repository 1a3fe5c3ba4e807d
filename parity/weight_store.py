"""Canonical weights on disk: written once, read a tensor (or a slice of rows) at a time.

At real sizes the weights must never exist twice: a Gemma-2B shape is 5 GB in
bfloat16 and 10 GB in float32, the machine has 24 GB. So random weights for a
real shape are generated once, tensor by tensor and chunk by chunk, into a
bfloat16 safetensors file in a cache directory; implementations then fill
their own parameters straight from the file (`read_into`), converting a few
rows at a time, so the only full copy in memory is the implementation's own.

Reads use `pread`, not a memory map: mapped pages that have been touched count
in the process's resident set until unmapped, page-cache reads do not.

The values are bit-identical to `weights.random_tensor` (same generator
stream per tensor, same float64 -> float32 -> bfloat16 rounding), so the
stored and in-memory weights of one spec and seed have the same hash; so are
the trained-like profile's (`weight_profiles.tensor_blocks`, a block of rows
at a time), cached under a file name that says the profile.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from parity.errors import ParityInputError
from parity.spec import GemmaSpec

CHUNK_ELEMENTS = 1 << 22  # rows are converted in blocks of about 4M elements (16 MB as float32)
_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4), "F64": (np.float64, 8)}


def cache_dir() -> Path:
    return Path(os.environ.get("PARITY_CACHE") or Path.home() / ".cache" / "parity")


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; inputs are finite."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def _rows_per_block(shape: tuple[int, ...]) -> int:
    """Rows of a tensor per block of about CHUNK_ELEMENTS elements (at least one)."""
    return max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))


def _bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------------ reading
class StoredTensors(Mapping):
    """name -> float32 array, read from a safetensors file on access (never cached).

    `read_into` fills a caller's buffer (any float dtype numpy can write,
    ml_dtypes.bfloat16 included) in row blocks; `rows` gathers a few rows
    (an embedding lookup) without reading the rest.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                if n > 100 << 20:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(f.read(n))
            size = self.path.stat().st_size
        except (OSError, ValueError, struct.error) as e:
            raise ParityInputError(f"{self.path}: not a readable safetensors file ({e}); re-export it") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
        for name, e in header.items():
            if e["dtype"] not in _DTYPES:
                raise ParityInputError(
                    f"{self.path}: tensor {name!r} is stored as {e['dtype']}; parity reads "
                    f"{', '.join(_DTYPES)} (convert the file)"
                )
            start, end = e["data_offsets"]
            shape = tuple(int(d) for d in e["shape"])
            if end - start != math.prod(shape) * _DTYPES[e["dtype"]][1] or self._base + end > size:
                raise ParityInputError(f"{self.path}: tensor {name!r} is truncated or its header is corrupt; "
                                       "re-export the file")
            self._entries[name] = (e["dtype"], shape, self._base + start)

    def __getitem__(self, name: str) -> np.ndarray:
        out = np.empty(self.shape(name), dtype=np.float32)
        self.read_into(name, out)
        return out

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._entries:
            raise KeyError(name)
        return self._entries[name][1]

    def _read(self, fd: int, name: str, row0: int, nrows: int, raw: bool = False) -> np.ndarray:
        """Rows [row0, row0 + nrows) as float32 (float64 stays float64; raw: as stored), shape [nrows, ...]."""
        dtype, shape, offset = self._entries[name]
        np_dtype, width = _DTYPES[dtype]
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        buf = os.pread(fd, nrows * row * width, offset + row0 * row * width)
        a = np.frombuffer(buf, dtype=np_dtype)
        if dtype == "BF16" and not raw:
            a = bf16_to_f32(a)
        elif dtype == "F16" and not raw:
            a = a.astype(np.float32)
        return a.reshape((nrows,) + tuple(shape[1:]) if len(shape) > 1 else (nrows,))

    def read_into(self, name: str, out: np.ndarray, row0: int = 0) -> None:
        """Fill `out` with rows [row0, row0 + len(out)) of tensor `name`, a block at a time."""
        shape = self.shape(name)
        n = out.shape[0] if out.ndim else 1
        if tuple(out.shape[1:]) != tuple(shape[1:]) or row0 + n > shape[0]:
            raise ValueError(f"{name}: rows {row0}..{row0 + n} of shape {shape} do not fit a buffer {out.shape}")
        step = _rows_per_block(shape)
        raw = out.dtype == _bfloat16() and self._entries[name][0] == "BF16"
        dest = out.view(np.uint16) if raw else out  # bfloat16 to bfloat16: copy the bits, convert nothing
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for r in range(0, n, step):
                k = min(step, n - r)
                dest[r:r + k] = self._read(fd, name, row0 + r, k, raw=raw)
        finally:
            os.close(fd)

    def rows(self, name: str, ids) -> np.ndarray:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return np.stack([self._read(fd, name, int(i), 1)[0] for i in ids])
        finally:
            os.close(fd)

    def blocks(self, name: str):
        """(row0, float32 block) pairs covering the tensor: for scans and hashes."""
        shape = self.shape(name)
        step = _rows_per_block(shape)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for r in range(0, shape[0], step):
                yield r, self._read(fd, name, r, min(step, shape[0] - r))
        finally:
            os.close(fd)

    def subset(self, names, metadata: dict) -> "StoredTensors":
        """The same file, seen through fewer tensors (a truncated depth)."""
        out = object.__new__(StoredTensors)
        out.path, out._base, out.metadata = self.path, self._base, dict(metadata)
        out._entries = {k: self._entries[k] for k in names}
        return out

    def nbytes_as(self, itemsize: int) -> int:
        return sum(math.prod(s) for _, s, _ in self._entries.values()) * itemsize


# ------------------------------------------------------------------ writing
def _random_blocks(name: str, shape: tuple[int, ...], seed: int, spec: GemmaSpec | None = None,
                   profile: str = "default"):
    """float32 blocks of rows equal to `weights.random_tensor(name, shape, seed)`, generated in order
    (for the trained-like profile: to `weight_profiles.trained_like_tensor(spec, name, shape, seed)`)."""
    from parity.weights import random_tensor

    if profile != "default":
        from parity.weight_profiles import tensor_blocks

        yield from tensor_blocks(spec, name, shape, seed, rows=_rows_per_block(shape))
        return
    if len(shape) == 1 or name.endswith("norm.weight"):
        yield random_tensor(name, shape, seed)
        return
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    step = _rows_per_block(shape)
    for r in range(0, shape[0], step):
        k = min(step, shape[0] - r)
        w = (rng.standard_normal((k, shape[1])) / math.sqrt(shape[1])).astype(np.float32)
        yield bf16_to_f32(bf16_bits(w))  # the same rounding as random_tensor's ml_dtypes cast


def spec_digest(spec: GemmaSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def write_random_weights(spec: GemmaSpec, seed: int, path: str | Path, progress=None,
                         profile: str = "default") -> Path:
    """Generate the seeded random weights of `spec` into a bfloat16 safetensors file, block by block.

    Tensors are written in sorted name order so the SHA-256 of their float32
    values (`Weights.hash`) is computed on the way, without a second pass.
    """
    from parity.trace import safetensors_header
    from parity.weights import canonical_shapes, random_source

    shapes = dict(sorted(canonical_shapes(spec).items()))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            # the hash goes in the header, which comes first: reserve it, then rewrite it at the end
            meta = {"spec": json.dumps(spec.to_dict()), "source": random_source(seed, profile),
                    "generator": "parity", "weights_hash": "0" * 16}
            entries = [(k, "BF16", s, 2) for k, s in shapes.items()]
            f.write(safetensors_header(entries, meta))
            for i, (name, shape) in enumerate(shapes.items()):
                if progress and i % 16 == 0:
                    progress(f"generating random weights: {name} ({i + 1}/{len(shapes)})")
                h.update(name.encode())
                h.update(b"float32")
                for block in _random_blocks(name, shape, seed, spec, profile):
                    h.update(np.ascontiguousarray(block).tobytes())
                    f.write(bf16_bits(block).tobytes())
            meta["weights_hash"] = h.hexdigest()[:16]
            f.seek(0)
            f.write(safetensors_header(entries, meta))  # same length: only the hash's 16 characters changed
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def stored_random_weights(spec: GemmaSpec, seed: int = 0, progress=None, profile: str = "default"):
    """The seeded random weights of `spec` (in `profile`), generated into the cache on first use, then read
    from there. A profile other than the default is named in the file name: the two never collide."""
    from parity.weights import Weights, check_profile, param_count, random_source

    suffix = "" if check_profile(profile) == "default" else f"-{profile}"
    path = cache_dir() / "weights" / f"{spec_digest(spec)}-seed{seed}{suffix}.safetensors"
    if not path.is_file():
        try:
            write_random_weights(spec, seed, path, progress, profile)
        except OSError as e:
            raise ParityInputError(
                f"cannot write random weights to {path.parent} ({e.strerror}); set PARITY_CACHE to a directory "
                f"with {param_count(spec) * 2 / 1e9:.1f} GB free"
            ) from None
    return Weights(spec, StoredTensors(path), source=random_source(seed, profile))
