"""A `--checkpoint DIR` converted the way llama.cpp's users convert it: llama.cpp's own `convert_hf_to_gguf.py`
on the directory as shipped, then (q4_0, q4_K) llama.cpp's own C quantizer, as `llama-quantize` runs it.

The converter is not part of llama-cpp-python's installed package: it lives in a llama.cpp source tree, found
through the environment variable PARITY_LLAMA_CPP (a folder holding convert_hf_to_gguf.py, its conversion/
package and gguf-py/; the llama-cpp-python sdist's vendor/llama.cpp is one, and .ci/run unpacks exactly those
parts of it). It runs as its users run it, `python convert_hf_to_gguf.py DIR --outfile F --outtype T`, in a
subprocess, with the tree's own gguf-py (the script puts it first on sys.path).

Where it cannot be used (no tree, a layout that is not an HF directory, the converter failing: a tiny checkpoint
without a real tokenizer, since Gemma 1/2 need tokenizer.model and Gemma 3 without one raises "BPE
pre-tokenizer was not recognized"), `Converted.path` is None and `loaded_by` says why, with the converter's
last error line; the adapter then writes the GGUF with parity's own writer (gguf_file.py).

Converted files go to parity's cache (cache_dir()/llama-cpp/converted), keyed by the checkpoint's content (the
weights' hash and every other file in the directory), the converter's own source and the weight type.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV = "PARITY_LLAMA_CPP"
SCRIPT = "convert_hf_to_gguf.py"
# the converter's own --outtype for each weight type; the rest are converted to f32 and then quantized by
# llama.cpp's C quantizer (llama_model_quantize, what llama-quantize calls), every matrix the one type (`pure`:
# parity's held reference models one activation rounding per file)
OUTTYPE = {"f32": "f32", "f16": "f16", "bf16": "bf16", "q8_0": "q8_0"}
QUANTIZE = {"q4_0": 2, "q4_k": 15}  # llama_ftype (include/llama.h): MOSTLY_Q4_0, MOSTLY_Q4_K_M (pure: all Q4_K)
GGML_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K"}
TIMEOUT_S = 3600  # a real-size checkpoint is read, converted and written on one core
WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")  # hashed through the weights' own hash


@dataclass(frozen=True)
class Converted:
    """The converter's GGUF (None: not converted, parity's writer is used) and the run's `weights_loaded_by`."""

    path: Path | None
    loaded_by: str


def tree() -> Path | None:
    """The llama.cpp source tree PARITY_LLAMA_CPP names, when it holds the converter."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    d = Path(text).expanduser()
    return d if (d / SCRIPT).is_file() else None


def _tree_missing() -> str:
    text = os.environ.get(ENV, "").strip()
    if not text:
        return (f"{ENV} is not set (a llama.cpp source tree with {SCRIPT}, conversion/ and gguf-py/, e.g. the "
                "llama-cpp-python sdist's vendor/llama.cpp)")
    return f"{ENV}={text} holds no {SCRIPT}; point it at a llama.cpp source tree"


def _source_hash(d: Path) -> str:
    """The converter's identity: its script and every .py of its conversion/ package and gguf-py."""
    h = hashlib.sha256()
    files = [d / SCRIPT, *sorted((d / "conversion").rglob("*.py")), *sorted((d / "gguf-py").rglob("*.py"))]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(d)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _checkpoint_hash(weights, directory: Path) -> str:
    """The checkpoint's content: its weights (their hash, computed once by parity) and every other file."""
    h = hashlib.sha256(weights.hash.encode())
    for f in sorted(directory.rglob("*")):
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and not f.name.endswith(".index.json"):
            h.update(str(f.relative_to(directory)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " ".join(lines[-1].split())[:300] if lines else "no output"


def _run_converter(d: Path, directory: Path, outtype: str, out: Path) -> str | None:
    """None when the converter wrote `out`; else its last error line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the tree's own gguf-py, as the script ships with it
    cmd = [sys.executable, str(d / SCRIPT), str(directory), "--outfile", str(out), "--outtype", outtype]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timed out after {TIMEOUT_S} s"
    if r.returncode != 0 or not out.is_file():
        return f"exit {r.returncode}: {_last_line(r.stderr or r.stdout)}"
    return None


def _quantize(src: Path, weight_type: str, out: Path) -> str | None:
    import llama_cpp

    from parity.adapters.llama_cpp.capture import quiet

    quiet()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZE[weight_type]
    params.nthread = 1
    params.pure = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    return None if rc == 0 and out.is_file() else f"llama_model_quantize({weight_type}) returned {rc}"


def _matrix_types(path: Path) -> set[str]:
    import gguf

    return {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) > 1}


def converted(weights, weight_type: str) -> Converted:
    """The converter's GGUF for `weights.checkpoint` in `weight_type`, converted once and cached; or why not."""
    ck = weights.checkpoint
    fallback = "parity's GGUF writer (gguf_file.py)"
    if ck is None:
        return Converted(None, f"{fallback}: the weights are not a whole checkpoint directory")
    if ck.layout != "hf":
        return Converted(None, f"{fallback}: llama.cpp's {SCRIPT} takes HF directories, not a {ck.layout} layout "
                               f"({ck.directory})")
    d = tree()
    if d is None:
        return Converted(None, f"{fallback}: {_tree_missing()}")
    directory = Path(ck.directory)
    from importlib.metadata import version

    from parity.model.weight_store import cache_dir

    key = hashlib.sha256("|".join([_checkpoint_hash(weights, directory), _source_hash(d), weight_type,
                                   version("llama-cpp-python") if weight_type in QUANTIZE else ""]).encode())
    folder = cache_dir() / "llama-cpp" / "converted"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{directory.name}-{key.hexdigest()[:16]}-{weight_type}.gguf"
    how = f"llama.cpp's {SCRIPT} ({d}) on {directory}, --outtype {OUTTYPE.get(weight_type, 'f32')}"
    if weight_type in QUANTIZE:
        how += f", then llama_model_quantize to {GGML_TYPE[weight_type]} (pure, as llama-quantize --pure)"
    if not path.is_file():
        with tempfile.TemporaryDirectory(prefix="convert-", dir=folder) as tmp:
            first = Path(tmp) / "converted.gguf"
            err = _run_converter(d, directory, OUTTYPE.get(weight_type, "f32"), first)
            if err is not None:
                return Converted(None, f"{fallback}: {SCRIPT} failed on {directory}: {err}")
            made = first
            if weight_type in QUANTIZE:
                made = Path(tmp) / "quantized.gguf"
                err = _quantize(first, weight_type, made)
                if err is not None:
                    return Converted(None, f"{fallback}: {err}")
            types = _matrix_types(made)
            if types != {GGML_TYPE[weight_type]}:
                # the held reference rounds activations for one weight type: a mixed file is not modelled
                return Converted(None, f"{fallback}: {SCRIPT} wrote matrices of types {sorted(types)}, not only "
                                       f"{GGML_TYPE[weight_type]} (a mixed file is not modelled by the held reference)")
            os.replace(made, path)  # whole or not at all
    return Converted(path, how)
