"""One safetensors file read a tensor, or a block of rows, at a time (`StoredTensors`), and bfloat16 bits.

Reads use `pread`, not a memory map: mapped pages that have been touched count
in the process's resident set until unmapped, page-cache reads do not. The
weight store writes such files; weights and checkpoints read them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from parity.errors import ParityInputError

CHUNK_ELEMENTS = 1 << 22  # rows are converted in blocks of about 4M elements (16 MB as float32)
_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4), "F64": (np.float64, 8)}


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
