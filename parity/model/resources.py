"""A cheap up-front estimate of what a run needs, checked against the machine before any weight is made.

A config.json with hidden_size 1000000000 once wrote 2 GB of random weights and
was killed by the kernel after two minutes, without a word. The estimate here
is arithmetic on the spec (microseconds), so an impossible run is refused as
bad input (exit 2, one line with the estimate and the fix) before anything is
generated or written.

Memory: the least the largest process can need. Torch implementations stream
a model that does not fit one layer at a time (`adapters.torch_load`), so the
floor in a dtype is the embedding, the untied head and the largest layer, plus
the activations of the longest prompt; a run whose floor exceeds the memory
available cannot succeed whichever implementation runs it. A process that also
holds the seeded weights in memory (small specs, one process) adds them.
Disk: the seeded weights' cache file (bfloat16) when it is still to be written.
The estimate errs low: it refuses only what cannot fit, never a run that could.
"""

from __future__ import annotations

import math

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from parity.errors import ParityInputError
from parity.model.spec import GemmaSpec

BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
ALLOW_ENV = "PARITY_ALLOW_LARGE"


@dataclass(frozen=True)
class Estimate:
    params: int
    memory: int  # bytes: the largest process's floor
    memory_what: str  # which part dominates, for the message
    disk: int  # bytes written to `disk_at` (0: nothing to write)
    disk_at: Path | None


def layer_params(spec: GemmaSpec, layer: int | None = None) -> int:
    """Parameters of one layer: `layer`'s, or the largest layer's (Gemma 1-3 layers all have the same shapes;
    Gemma 4's differ by type, KV sharing and MLP width)."""
    if spec.family == 4:
        from parity.model.canonical import gemma4_shapes

        per = [0] * spec.num_layers
        for name, shape in gemma4_shapes(spec).items():
            if name.startswith("model.layers."):
                per[int(name.split(".")[2])] += math.prod(shape)
        return max(per) if layer is None else per[layer]
    h, i, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    norms = h * (4 if spec.norm_placement == "sandwich" else 2) + (2 * hd if spec.qk_norm else 0)
    return 2 * q * h + 2 * kv * h + 3 * i * h + norms


def ple_params(spec: GemmaSpec) -> int:
    """Gemma 4's per-layer embedding table, its projection and norm: outside every layer, like the embedding."""
    if not spec.ple_dim:
        return 0
    lp = spec.num_layers * spec.ple_dim
    return spec.ple_rows * lp + lp * spec.hidden_size + spec.ple_dim


def estimate(spec: GemmaSpec, dtypes, tokens: int, weights_in_memory: bool, cache_file: Path | None) -> Estimate:
    """What the run needs: `dtypes` every dtype a model is built in (the reference's too), `tokens` the
    longest sequence run, `weights_in_memory` whether one process holds all float32 weights besides a model,
    `cache_file` the seeded weights' file still to be written (None: nothing to write)."""
    from parity.model.weights import param_count

    params = param_count(spec)
    widest = max(BYTES[d] for d in dtypes)
    embed = spec.vocab_size * spec.hidden_size * (1 if spec.tied_head else 2) + ple_params(spec)
    floor = (embed + layer_params(spec) + spec.hidden_size) * widest
    # the working set of one layer and the head on the longest prompt (scores: heads x T x T)
    acts = tokens * (spec.vocab_size + 2 * spec.intermediate_size + spec.num_heads * tokens + 8 * spec.hidden_size)
    memory = floor + acts * widest
    what = f"{_size(floor)} of {max(dtypes, key=BYTES.get)} weights that cannot be streamed (embedding, head, one " \
           f"layer) and {_size(acts * widest)} of activations"
    if weights_in_memory:
        memory += params * 4
        what += f", with {_size(params * 4)} of float32 weights held in the same process"
    disk = params * 2 if cache_file is not None else 0
    return Estimate(params, memory, what, disk, cache_file)


def check(est: Estimate, allow: bool = False) -> None:
    """Refuse an estimate the machine cannot hold (bad input, one line), unless `allow` or PARITY_ALLOW_LARGE=1."""
    if allow or allowed_by_env():
        return
    fix = ("run the spec's first layers with --first-layers N, give a smaller spec, or pass --allow-large "
           f"({ALLOW_ENV}=1) if you know better")
    avail = available_memory()
    if avail is not None and est.memory > avail:
        raise ParityInputError(f"the spec ({est.params:.3g} parameters) needs at least {_size(est.memory)} of memory "
                               f"in one process ({est.memory_what}) but {_size(avail)} is available; {fix}")
    if est.disk and est.disk_at is not None:
        free = free_disk(est.disk_at)
        if free is not None and est.disk > free:
            raise ParityInputError(f"the spec's seeded weights ({est.params:.3g} parameters in bfloat16) need "
                                   f"{_size(est.disk)} on disk at {est.disk_at.parent} but {_size(free)} is free; "
                                   f"{fix}, or set PARITY_CACHE to a larger disk")


def allowed_by_env() -> bool:
    text = os.environ.get(ALLOW_ENV, "")
    if text not in ("", "0", "1"):
        raise ParityInputError(f"{ALLOW_ENV}={text!r}; set it to 1 (skip the memory and disk estimate) or 0")
    return text == "1"


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, lowered to a cgroup's limit (None: unknown)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's limit is the real one
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return avail


def free_disk(path: Path) -> int | None:
    """Free bytes on the file system that will hold `path` (its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
