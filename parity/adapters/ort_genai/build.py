"""The model onnxruntime-genai's own builder makes, from an HF directory written from the spec and the weights,
or (`built_shipped`, a --checkpoint run) from the checkpoint directory as shipped.

The directory is what a user hands the builder: config.json (parity's HF config), model.safetensors (the
canonical tensors, which are HF's names) and a WordLevel tokenizer (the builder loads a tokenizer and writes
its processing files; the vocabulary is just `t0..t{V-1}`). The builder runs as its users run it,
`python -m onnxruntime_genai.models.builder -i DIR -o OUT -p PRECISION -e cpu`, in a subprocess, offline.

Gemma 3 (transformers 5): AutoConfig nests RoPE per layer type (`rope_parameters = {"full_attention": ...,
"sliding_attention": ...}`) and the builder reads `rope_parameters["rope_type"]`, a KeyError. The builder is
then started through a shim (SHIM below) that hands it the transformers-4.x view of the same config
(`rope_parameters` = the global layers' dict, `rope_theta`, `rope_local_base_freq`); the run records it.

Builds are cached under PARITY_CACHE/ort-genai/<key> (the key: the config, the weights' hash, the precision
and the builder's version), so a second run on the same model skips the 20-30 s build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from parity.model.spec import GemmaSpec, to_hf_config
from parity.model.weight_store import cache_dir
from parity.model.weights import Weights

PRECISIONS = ("fp32", "int8", "int4")
TIMEOUT_S = 1800  # a real-size int4 build quantizes every matrix on one core

# Started as `python -c SHIM ARGS...`: the builder's own main, with AutoConfig's Gemma 3 text config given
# the transformers-4.x RoPE keys the builder reads (transformers 5 nests them per layer type).
SHIM = r"""
import runpy, sys, transformers
_load = transformers.AutoConfig.from_pretrained
def from_pretrained(*a, **k):
    c = _load(*a, **k)
    rp = getattr(c, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp:
        full, local = rp["full_attention"], rp.get("sliding_attention", rp["full_attention"])
        c.rope_parameters = dict(full)
        c.rope_theta = full["rope_theta"]
        c.rope_local_base_freq = local["rope_theta"]
    return c
transformers.AutoConfig.from_pretrained = from_pretrained
sys.argv = ["builder"] + sys.argv[1:]
# 0.18's builder has no main(): its command line is its `if __name__ == "__main__"` block, run as -m runs it
# (its `from transformers import AutoConfig` is the class patched above)
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""
SHIM_NOTE = ("started through parity's config shim: transformers 5 nests Gemma 3's rope_parameters per layer type "
             "and this builder reads rope_parameters['rope_type'] (KeyError); the shim hands it the global layers' "
             "dict plus rope_theta and rope_local_base_freq, the transformers-4.x keys")


def needs_shim(spec: GemmaSpec) -> bool:
    """Whether this transformers nests the spec's RoPE per layer type (Gemma 3 under transformers 5)."""
    if spec.family != 3:
        return False
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def hf_config(spec: GemmaSpec) -> dict:
    cfg = to_hf_config(spec)
    cfg.pop("parity", None)  # choices HF cannot express: check() refuses specs that need them
    cfg["torch_dtype"] = "float32"
    return cfg


def write_hf_dir(spec: GemmaSpec, weights: Weights, d: Path) -> None:
    """config.json, model.safetensors (float32, the canonical HF names) and a WordLevel tokenizer."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config(spec), indent=1))
    tensors = {}
    for name in weights.tensors:
        out = np.empty(weights.shape(name), np.float32)
        weights.read_into(name, out)
        tensors[name] = out
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    vocab = {f"t{i}": i for i in range(spec.vocab_size)}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": f"t{spec.bos_token_id}", "eos_token": "t1",
        "pad_token": "t0", "unk_token": "t0"}))


def build_key(spec: GemmaSpec, weights: Weights, precision: str, options: dict[str, str] | None = None) -> str:
    import onnxruntime_genai as og

    h = hashlib.sha256(json.dumps(hf_config(spec), sort_keys=True).encode())
    h.update(f"{weights.hash}|{precision}|{og.__version__}".encode())
    if options:  # none for fp32: its key (and cached builds) stay as they were
        h.update(json.dumps(options, sort_keys=True).encode())
    return h.hexdigest()[:20]


def extra_args(options: dict[str, str] | None) -> list[str]:
    """The builder's `--extra_options KEY=VALUE ...` for `options` (none: no flag)."""
    return ["--extra_options", *(f"{k}={v}" for k, v in options.items())] if options else []


def built(spec: GemmaSpec, weights: Weights, precision: str,
          options: dict[str, str] | None = None) -> tuple[Path, list[str], bool]:
    """(the builder's output folder, its command line, whether the shim started it); built unless cached.
    `options`: the builder's extra options, passed explicitly (the quantizer's block size, accuracy level)."""
    if precision not in PRECISIONS:
        raise ValueError(f"ort-genai precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    shim = needs_shim(spec)
    out = cache_dir() / "ort-genai" / build_key(spec, weights, precision, options)
    args = ["-o", str(out), "-p", precision, "-e", "cpu", *extra_args(options)]
    shown = ["python", "-m", "onnxruntime_genai.models.builder", "-i", "<hf dir>", *args]
    if (out / "genai_config.json").is_file() and (out / "model.onnx").is_file():
        return out, shown, shim
    _build(lambda hf: write_hf_dir(spec, weights, hf), None, out, precision, options, shim, shown)
    return out, shown, shim


def _build(write, directory: Path | None, out: Path, precision: str, options: dict[str, str] | None, shim: bool,
           shown: list[str]) -> None:
    """The builder run on `directory` (None: an HF directory `write` fills in a temporary folder) into `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="part-", dir=out.parent) as tmp:
        part = Path(tmp) / "out"
        hf = directory
        if hf is None:
            hf = Path(tmp) / "hf"
            write(hf)
        argv = ["-i", str(hf), "-o", str(part), "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache"),
                *extra_args(options)]
        cmd = [sys.executable, "-c", SHIM, *argv] if shim else [sys.executable, "-m",
                                                                   "onnxruntime_genai.models.builder", *argv]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
        if r.returncode != 0 or not (part / "model.onnx").is_file():
            tail = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()][-1:] or ["no output"]
            raise RuntimeError(f"onnxruntime-genai's builder failed (exit {r.returncode}): {tail[0].strip()[:300]}; "
                               f"command: {' '.join(shown)}")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(part, out)  # whole or not at all: a killed build leaves no half folder at `out`


def built_shipped(spec: GemmaSpec, weights: Weights, directory: Path, precision: str,
                  options: dict[str, str] | None = None) -> tuple[Path, list[str], bool]:
    """As `built`, on a checkpoint directory as shipped (`-i DIR`, as the builder's users run it), keyed by its
    content (the weights' hash and every other file). Raises RuntimeError with the builder's last line."""
    if precision not in PRECISIONS:
        raise ValueError(f"ort-genai precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    shim = needs_shim(spec)
    h = hashlib.sha256(f"shipped|{build_key(spec, weights, precision, options)}".encode())
    for f in sorted(directory.rglob("*")):
        if f.is_file() and not f.name.endswith(".safetensors"):  # the weights are in weights.hash
            h.update(str(f.relative_to(directory)).encode())
            h.update(f.read_bytes())
    out = cache_dir() / "ort-genai" / h.hexdigest()[:20]
    args = ["-o", str(out), "-p", precision, "-e", "cpu", *extra_args(options)]
    shown = ["python", "-m", "onnxruntime_genai.models.builder", "-i", str(directory), *args]
    if not ((out / "genai_config.json").is_file() and (out / "model.onnx").is_file()):
        _build(None, directory, out, precision, options, shim, shown)
    return out, shown, shim
