"""The safetensors format, in one place: its dtype codes, its header, a streaming writer and a lazy reader.

Layout: 8-byte little-endian header length, the JSON header (per tensor its
dtype code, shape and data_offsets; `__metadata__`, strings only), then each
tensor's little-endian bytes in header order.

Traces, the weight store, saved weights and checkpoints all go through here.
`write_safetensors` takes tensors one at a time (or a tensor a block of rows
at a time), so only one is in memory. `TensorFile` reads the header and then
a tensor, or a block of rows, by its offsets when asked; `StoredTensors` is the
float32 mapping the weights use.

Reads use `pread`, not a memory map: mapped pages that have been touched count
in the process's resident set until unmapped, page-cache reads do not.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from parity.errors import ParityInputError

CHUNK_ELEMENTS = 1 << 22  # rows are converted in blocks of about 4M elements (16 MB as float32)
MAX_HEADER = 100 << 20  # a longer header is a corrupt length, not a real file

# safetensors dtype code -> numpy dtype name (None: numpy has no such type), bytes per element
CODES = {"BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "F8_E4M3": (None, 1), "F8_E5M2": (None, 1),
         "U16": ("uint16", 2), "I16": ("int16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
         "U32": ("uint32", 4), "I32": ("int32", 4), "F32": ("float32", 4),
         "U64": ("uint64", 8), "I64": ("int64", 8), "F64": ("float64", 8)}
FLOATS = ("BF16", "F16", "F32", "F64")  # what parity reads as weights
_CODE_OF = {np_name: code for code, (np_name, _) in CODES.items() if np_name}

# (name, shape, dtype, fetch): fetch() gives the array, or an iterator of its blocks of rows, when its turn comes
TensorEntry = tuple[str, tuple[int, ...], np.dtype, Callable[[], "np.ndarray | Iterable[np.ndarray]"]]


# ------------------------------------------------------------------------------------------ dtypes
def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; inputs are finite."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype a code's tensors are read as (BF16: ml_dtypes.bfloat16)."""
    name = CODES.get(code, (None, 0))[0]
    if name is None:
        raise ValueError(f"dtype code {code!r} has no numpy type")
    return _bfloat16() if name == "bfloat16" else np.dtype(name)


def dtype_code(dtype) -> str:
    """The code a numpy dtype is stored under; ValueError for one safetensors cannot hold."""
    dt = np.dtype(dtype)
    if dt.name not in _CODE_OF:
        raise ValueError(f"dtype {dt} has no safetensors code; use one of {sorted(_CODE_OF)}")
    return _CODE_OF[dt.name]


def _rows_per_block(shape: tuple[int, ...]) -> int:
    """Rows of a tensor per block of about CHUNK_ELEMENTS elements (at least one)."""
    return max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))


# ------------------------------------------------------------------------------------------ writing
def encode_header(tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header of a file whose tensors (name, code, shape) follow in this order.

    The JSON is padded with spaces to a multiple of 8, so the data starts aligned; equal inputs give equal
    lengths, which lets a writer rewrite the header in place once late metadata is known.
    """
    header: dict = {}
    offset = 0
    for name, code, shape in tensors:
        nbytes = CODES[code][1] * math.prod(shape)
        header[name] = {"dtype": code, "shape": [int(n) for n in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _little_endian_bytes(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8)


CHECKSUM = "parity_sha256"  # metadata key: SHA-256 of the data section, as written


def write_safetensors(path: str | Path, entries: Iterable[TensorEntry], metadata: dict[str, str] | None = None,
                      late_metadata: Callable[[], dict[str, str]] | None = None, checksum: bool = False) -> Path:
    """A safetensors file written one tensor (or one block of rows) at a time, so only that is in memory.

    `late_metadata()`, called once every tensor is written, updates metadata whose values were reserved at
    their final length (a hash of what was written). With `checksum`, the SHA-256 of every data byte goes in
    the metadata under CHECKSUM the same way, for `TensorFile.verify`. The file appears under `path` only when
    complete: it is written beside it and renamed, so a failure, or a second process writing the same file,
    leaves no half file.
    """
    entries = list(entries)
    seen: set[str] = set()
    for name, _, dtype, _ in entries:
        if name in seen or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} given twice or reserved")
        seen.add(name)
        try:
            dtype_code(dtype)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from None
    layout = [(n, dtype_code(d), tuple(s)) for n, s, d, _ in entries]
    digest = hashlib.sha256() if checksum else None
    if checksum:
        metadata = {**(metadata or {}), CHECKSUM: "0" * 64}  # reserved at its length, filled in at the end
        late = late_metadata
        late_metadata = lambda: {**(late() if late else {}), CHECKSUM: digest.hexdigest()}  # noqa: E731
    header = encode_header(layout, metadata)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as raw:
            raw.write(header)
            f = _Hashing(raw, digest) if digest is not None else raw
            for name, shape, dtype, fetch in entries:
                _write_tensor(f, name, tuple(shape), np.dtype(dtype), fetch())
            f = raw
            if late_metadata is not None:
                again = encode_header(layout, {**(metadata or {}), **late_metadata()})
                if len(again) != len(header):
                    raise ValueError("late metadata changed the header's length; reserve each value at its length")
                f.seek(0)
                f.write(again)
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


class _Hashing:
    """A file's write, with every byte also fed to a hash (the data section's checksum)."""

    def __init__(self, f, digest) -> None:
        self.f, self.digest = f, digest

    def write(self, b) -> int:
        self.digest.update(b)
        return self.f.write(b)


def _write_tensor(f, name: str, shape: tuple[int, ...], dtype: np.dtype, got) -> None:
    def refuse(a: np.ndarray, what: str) -> None:
        raise ValueError(f"tensor {name!r} is {a.dtype}{list(a.shape)} {what}, {dtype}{list(shape)} when announced")

    if isinstance(got, np.ndarray) or not isinstance(got, Iterator):
        a = np.asarray(got)
        if a.shape != shape or a.dtype.name != dtype.name:
            refuse(a, "when written")
        f.write(_little_endian_bytes(a))
        return
    rows = 0
    for block in got:
        a = np.asarray(block)
        if a.dtype.name != dtype.name or a.shape[1:] != shape[1:] or not shape or rows + len(a) > shape[0]:
            refuse(a, f"in the block at row {rows}")
        f.write(_little_endian_bytes(a))
        rows += len(a)
    if shape and rows != shape[0]:
        raise ValueError(f"tensor {name!r}: its blocks hold {rows} rows, {shape[0]} announced")


# ------------------------------------------------------------------------------------------ reading
class TensorFile:
    """A safetensors file's header, checked against its size; tensors read by name at their offsets, on each ask.

    Nothing is cached, so the file must stay where it is. `get_tensor` gives a tensor as stored; `float32`,
    `read_into`, `rows` and `blocks` convert floating-point tensors a block of rows at a time.
    """

    def __init__(self, path: str | Path, fix: str = "re-export the file") -> None:
        self.path, self._fix = Path(path), fix  # fix: what a message about a bad file tells the user to do
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(MAX_HEADER, size - 8):
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self._bad(f"not a readable safetensors file ({e})") from None
        if not isinstance(header, dict) or not all(
                isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= set(e)
                for k, e in header.items() if k != "__metadata__"):
            raise self._bad("safetensors header is malformed")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._entries: dict[str, tuple[str, tuple[int, ...], int]] = {}  # name -> code, shape, file offset
        self._full: dict[str, tuple[int, ...]] = {}  # a column view's stored shape (subset's `columns`)
        for name, e in header.items():
            code, shape = e["dtype"], tuple(int(d) for d in e["shape"])
            lo, hi = (int(x) for x in e["data_offsets"])
            # an unknown code's width is unknown: such a tensor is refused when read, not here
            width = CODES.get(code, (None, None))[1]
            if not 0 <= lo <= hi or self._base + hi > size or (width and hi - lo != math.prod(shape) * width):
                raise self._bad(f"tensor {name!r} is truncated or its header is corrupt")
            self._entries[name] = (code, shape, self._base + lo)

    def verify(self) -> None:
        """The data section hashes to the CHECKSUM the writer recorded: a flipped bit or a cut file is refused
        here, as bad input naming the file, instead of being compared as if it were a divergence."""
        want = self.metadata.get(CHECKSUM)
        if want is None:
            raise self._bad(f"no {CHECKSUM} checksum in its metadata (written by an older parity, or edited)")
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            f.seek(self._base)
            while chunk := f.read(1 << 20):  # 1 MiB at a time: a trace is read a tap at a time
                h.update(chunk)
        if h.hexdigest() != want:
            raise self._bad("its contents do not match their checksum (the file is corrupt or was edited)")

    def _bad(self, why: str) -> ParityInputError:
        return ParityInputError(f"{self.path}: {why}; {self._fix}")

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._entries:
            raise KeyError(name)
        return self._entries[name][1]

    def layout(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and stored dtype, without reading the tensor."""
        return self.shape(name), numpy_dtype(self._entries[name][0])

    def get_tensor(self, name: str) -> np.ndarray:
        """The tensor as stored, in a fresh writable array."""
        shape, dtype = self.layout(name)
        if name in self._full:  # a column view: its rows are not contiguous in the file
            fd = os.open(self.path, os.O_RDONLY)
            try:
                return np.array(self._read(fd, name, 0, shape[0], raw=True)).view(dtype)
            finally:
                os.close(fd)
        out = np.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self._entries[name][2])
            if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                raise self._bad(f"tensor {name!r} ends early")
        return out

    def _float_code(self, name: str) -> str:
        code = self._entries[name][0]
        if code not in FLOATS:
            raise ParityInputError(f"{self.path}: tensor {name!r} is stored as {code}; parity reads "
                                   f"{', '.join(FLOATS)} (convert the file)")
        return code

    def _read(self, fd: int, name: str, row0: int, nrows: int, raw: bool = False) -> np.ndarray:
        """Rows [row0, row0 + nrows) as float32 (float64 stays float64; raw: as stored), shape [nrows, ...]."""
        code, shape, offset = self._entries[name]
        stored = self._full.get(name, shape)  # a column view reads whole stored rows, then keeps its columns
        width = CODES[self._float_code(name)][1]
        row = math.prod(stored[1:]) if len(stored) > 1 else 1
        buf = os.pread(fd, nrows * row * width, offset + row0 * row * width)
        a = np.frombuffer(buf, dtype=np.uint16 if code == "BF16" else numpy_dtype(code))
        if name in self._full:  # [nrows, stored columns] -> [nrows, the view's first columns]
            a = np.ascontiguousarray(a.reshape(nrows, stored[1])[:, :shape[1]]).reshape(-1)
        if code == "BF16" and not raw:
            a = bf16_to_f32(a)
        elif code == "F16" and not raw:
            a = a.astype(np.float32)
        return a.reshape((nrows,) + tuple(shape[1:]) if len(shape) > 1 else (nrows,))

    def float32(self, name: str) -> np.ndarray:
        out = np.empty(self.shape(name), dtype=np.float32)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: np.ndarray, row0: int = 0) -> None:
        """Fill `out` (any float dtype numpy can write, ml_dtypes.bfloat16 included) with rows
        [row0, row0 + len(out)) of tensor `name`, a block at a time."""
        shape = self.shape(name)
        n = out.shape[0] if out.ndim else 1
        if tuple(out.shape[1:]) != tuple(shape[1:]) or row0 + n > (shape[0] if shape else 1):
            raise ValueError(f"{name}: rows {row0}..{row0 + n} of shape {shape} do not fit a buffer {out.shape}")
        step = _rows_per_block(shape)
        raw = out.dtype == _bfloat16() and self._float_code(name) == "BF16"
        dest = out.view(np.uint16) if raw else out  # bfloat16 to bfloat16: copy the bits, convert nothing
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for r in range(0, n, step):
                k = min(step, n - r)
                dest[r:r + k] = self._read(fd, name, row0 + r, k, raw=raw)
        finally:
            os.close(fd)

    def rows(self, name: str, ids) -> np.ndarray:
        """A few rows (an embedding lookup) without reading the rest."""
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


class StoredTensors(TensorFile, Mapping):
    """name -> float32 array, read from a safetensors file of floating-point tensors on access (never cached)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        for name in self._entries:
            self._float_code(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.float32(name)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def subset(self, names, metadata: dict, columns: dict[str, int] | None = None,
               rows: dict[str, int] | None = None) -> "StoredTensors":
        """The same file, seen through fewer tensors (a truncated depth); `columns` / `rows` keep only the
        first columns of 2-D tensors / the first rows of tensors (Gemma 4's per-layer embedding table and its
        projection hold every layer's part side by side)."""
        out = object.__new__(StoredTensors)
        out.path, out._fix, out._base, out.metadata = self.path, self._fix, self._base, dict(metadata)
        out._entries = {k: self._entries[k] for k in names}
        out._full = {k: v for k, v in self._full.items() if k in out._entries}
        for k, n in (columns or {}).items():
            code, shape, offset = out._entries[k]
            if len(shape) != 2 or not 0 < n <= shape[1]:
                raise ValueError(f"{k}: cannot keep {n} columns of a tensor of shape {shape}")
            out._full.setdefault(k, shape)
            out._entries[k] = (code, (shape[0], n), offset)
        for k, n in (rows or {}).items():  # a row prefix of a row-major tensor: the same offset, fewer rows
            code, shape, offset = out._entries[k]
            if k in out._full or not shape or not 0 < n <= shape[0]:
                raise ValueError(f"{k}: cannot keep {n} rows of a tensor of shape {shape}")
            out._entries[k] = (code, (n, *shape[1:]), offset)
        return out

    def nbytes_as(self, itemsize: int) -> int:
        return sum(math.prod(s) for _, s, _ in self._entries.values()) * itemsize
