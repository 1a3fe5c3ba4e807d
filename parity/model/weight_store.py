"""Canonical weights on disk: written once, read a tensor (or a slice of rows) at a time.

At real sizes the weights must never exist twice: a Gemma-2B shape is 5 GB in
bfloat16 and 10 GB in float32, the machine has 24 GB. So random weights for a
real shape are generated once, tensor by tensor and chunk by chunk, into a
bfloat16 safetensors file in a cache directory; implementations then fill
their own parameters straight from the file (`read_into`), converting a few
rows at a time, so the only full copy in memory is the implementation's own.

The file format, its writer and its reader are `parity.model.tensor_file`'s.

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
import zlib
from pathlib import Path

import numpy as np

from parity.errors import ParityInputError
from parity.model.spec import GemmaSpec
from parity.model.tensor_file import (  # noqa: F401 -- CHUNK_ELEMENTS: re-exported for existing callers
    CHUNK_ELEMENTS, StoredTensors, _rows_per_block, bf16_bits, bf16_to_f32, numpy_dtype, write_safetensors,
)
from parity.model.weights import (
    canonical_shapes, check_profile, matrix_divisor, param_count, random_source, random_tensor, Weights,
)

def cache_dir() -> Path:
    return Path(os.environ.get("PARITY_CACHE") or Path.home() / ".cache" / "parity")


# ------------------------------------------------------------------ writing
def _random_blocks(name: str, shape: tuple[int, ...], seed: int, spec: GemmaSpec | None = None,
                   profile: str = "default"):
    """float32 blocks of rows equal to `weights.random_tensor(name, shape, seed)`, generated in order
    (for the trained-like profile: to `weight_profiles.trained_like_tensor(spec, name, shape, seed)`)."""

    if profile != "default":
        from parity.model.weight_profiles import tensor_blocks

        yield from tensor_blocks(spec, name, shape, seed, rows=_rows_per_block(shape))
        return
    if len(shape) == 1 or name.endswith("norm.weight"):
        yield random_tensor(name, shape, seed, spec)
        return
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    step = _rows_per_block(shape)
    divisor = math.sqrt(shape[1]) if spec is None else matrix_divisor(name, shape, spec)
    for r in range(0, shape[0], step):
        k = min(step, shape[0] - r)
        w = (rng.standard_normal((k, *shape[1:])) / divisor).astype(np.float32)
        yield bf16_to_f32(bf16_bits(w))  # the same rounding as random_tensor's ml_dtypes cast


def spec_digest(spec: GemmaSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def write_random_weights(spec: GemmaSpec, seed: int, path: str | Path, progress=None,
                         profile: str = "default") -> Path:
    """Generate the seeded random weights of `spec` into a bfloat16 safetensors file, block by block.

    Tensors are written in sorted name order so the SHA-256 of their float32
    values (`Weights.hash`) is computed on the way, without a second pass.
    """

    shapes = dict(sorted(canonical_shapes(spec).items()))
    h = hashlib.sha256()
    bf16 = numpy_dtype("BF16")

    def blocks(i: int, name: str, shape: tuple[int, ...]):
        if progress and i % 16 == 0:
            progress(f"generating random weights: {name} ({i + 1}/{len(shapes)})")
        h.update(name.encode())
        h.update(b"float32")
        for block in _random_blocks(name, shape, seed, spec, profile):
            h.update(np.ascontiguousarray(block).tobytes())
            yield bf16_bits(block).view(bf16)

    entries = [(k, s, bf16, lambda i=i, k=k, s=s: blocks(i, k, s)) for i, (k, s) in enumerate(shapes.items())]
    # the hash goes in the header, which comes first: reserved at its length, filled in once the data is written
    meta = {"spec": json.dumps(spec.to_dict()), "source": random_source(seed, profile), "generator": "parity",
            "weights_hash": "0" * 16}
    return write_safetensors(path, entries, meta, late_metadata=lambda: {"weights_hash": h.hexdigest()[:16]})


def sweep_parts(folder: Path) -> None:
    """Remove `.NAME.PID.part` files that a killed process left (SIGKILL, the kernel's OOM killer: no `finally`
    ran), so one bad run never keeps gigabytes in the cache. A live process's part file is left alone."""
    for part in Path(folder).glob(".*.part"):
        pid = part.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            part.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def stored_random_weights(spec: GemmaSpec, seed: int = 0, progress=None, profile: str = "default"):
    """The seeded random weights of `spec` (in `profile`), generated into the cache on first use, then read
    from there. A profile other than the default is named in the file name: the two never collide."""

    suffix = "" if check_profile(profile) == "default" else f"-{profile}"
    path = cache_dir() / "weights" / f"{spec_digest(spec)}-seed{seed}{suffix}.safetensors"
    if not path.is_file():
        sweep_parts(path.parent)
        try:
            write_random_weights(spec, seed, path, progress, profile)
        except OSError as e:
            raise ParityInputError(
                f"cannot write random weights to {path.parent} ({e.strerror}); set PARITY_CACHE to a directory "
                f"with {param_count(spec) * 2 / 1e9:.1f} GB free"
            ) from None
    return Weights(spec, StoredTensors(path), source=random_source(seed, profile), generated=True)
