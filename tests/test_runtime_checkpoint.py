"""`--checkpoint DIR` through each runtime's own converter or loader (issue 20 item 2): real runtimes on tiny
checkpoints written by transformers' save_pretrained, with a tiny sentencepiece tokenizer trained here.

llama.cpp's converter comes from the source tree PARITY_LLAMA_CPP names (.ci/run unpacks it from the
llama-cpp-python sdist); without it the llama.cpp tests skip with that reason."""

import dataclasses
import io
import os
import random
import shutil

import pytest

from parity.model.presets import PRESETS
from parity.model.weights import random_weights

pytestmark = pytest.mark.filterwarnings("ignore")
CONVERTER = "convert_hf_to_gguf.py"
SHORT = {"p": [2] + list(range(5, 16))}  # 12 tokens: inside the window (mlx-lm's Gemma 2 has none)
LONG = {"p": [2] + list(range(5, 25))}  # 21 tokens: past the window of 16


def _need(*mods):
    for m in mods:
        pytest.importorskip(m)


def _converter_tree():
    from parity.adapters.llama_cpp.convert import ENV, tree

    if tree() is None:
        pytest.skip(f"no llama.cpp converter tree: set {ENV} to a folder with {CONVERTER} (.ci/run unpacks it "
                    "from the llama-cpp-python sdist)")


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    """A 200-piece sentencepiece model trained on generated text (ids 0..3: pad, eos, bos, unk, as Gemma's);
    llama.cpp's converter pads the vocabulary to the config's vocab_size with [PAD] tokens."""
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(300)]
    text = tmp_path_factory.mktemp("spm") / "text.txt"
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)))
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(input=str(text), model_writer=out, vocab_size=200, model_type="bpe",
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    path = text.parent / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


def save(spec, directory, tokenizer=None):
    """`spec`'s seeded random weights saved by transformers' own save_pretrained (plus tokenizer.model)."""
    _need("transformers", "torch")
    from parity.adapters import get_adapter
    from parity.model.checkpoints import load_checkpoint

    get_adapter("hf").build(spec, random_weights(spec, seed=0), "float32").save_pretrained(str(directory))
    if tokenizer is not None:
        shutil.copy(tokenizer, directory / "tokenizer.model")
    return load_checkpoint(directory)


def run(spec, weights, impls, prompts):
    from parity.harness import Request, run as run_

    return run_(Request(spec=spec, weights=weights, impls=["litgpt-style", *impls], dtypes=["float32"],
                        prompts=prompts))


def loaded_by(report, run):
    return report.effective[f"{run}@float32"]["library"].get("weights_loaded_by", "")


def h64(preset):
    # hidden 64: sqrt(64) = 8 survives onnxruntime-genai's 2-decimal rounding of the embedding scale
    # (docs/findings.md), so a correct build PASSes
    return dataclasses.replace(PRESETS[preset], hidden_size=64, name=f"{preset}-h64")


# ------------------------------------------------------------------ all three runtimes on one shipped checkpoint
def test_each_runtime_takes_the_shipped_directory_and_passes(tmp_path, tokenizer_model, monkeypatch):
    _need("llama_cpp", "gguf", "mlx_lm", "onnxruntime_genai", "onnx_ir")
    _converter_tree()
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "tiny-gemma2-h64"
    spec, w = save(h64("tiny-gemma2"), d, tokenizer_model)
    assert w.checkpoint is not None and w.checkpoint.layout == "hf"
    rep = run(spec, w, ["llama-cpp", "llama-cpp-q8_0", "mlx", "ort-genai"], SHORT)
    assert rep.passed is True, [(f.impl, f.tap, f.cause, f.evidence[:200]) for f in rep.diagnosis]
    converted = tmp_path / "cache" / "llama-cpp" / "converted"
    for impl in ("llama-cpp", "llama-cpp-q8_0"):
        how = loaded_by(rep, impl)
        assert how.startswith("llama.cpp's convert_hf_to_gguf.py") and str(d) in how, how
        assert (converted / rep.effective[f"{impl}@float32"]["library"]["gguf"]).is_file()  # the file loaded
    assert "--outtype q8_0" in loaded_by(rep, "llama-cpp-q8_0")
    # the q8_0 run is judged against the port on the weights the converter's file holds
    import numpy as np

    from parity.adapters.llama_cpp.gguf_file import HeldTensors

    held = rep.held["llama-cpp-q8_0@float32"].weights
    assert held.source == "llama-cpp-q8_0 GGUF"
    name = "model.layers.0.mlp.gate_proj.weight"
    assert np.array_equal(held.tensors[name], HeldTensors(spec, converted / rep.effective[
        "llama-cpp-q8_0@float32"]["library"]["gguf"])[name])
    assert loaded_by(rep, "mlx") == f"mlx-lm's load_model({d})"
    assert loaded_by(rep, "ort-genai") == f"onnxruntime-genai's model builder on {d} (-i, as shipped)"
    assert d.is_dir() and (d / "config.json").is_file()  # mlx's release never removes the user's directory


# ------------------------------------------------------------------ llama.cpp: the converter can drop a value
def test_the_converter_drops_gemma3_layer_types(tmp_path, tokenizer_model, monkeypatch):
    """A real finding (docs/findings.md): convert_hf_to_gguf.py's Gemma 3 writes attention.sliding_window but no
    sliding_window_pattern, so llama.cpp takes its period-6 default whatever `layer_types` says. A checkpoint
    whose global layers are every second one FAILs at layer 1, named config-value-dropped (rope_base)."""
    _need("llama_cpp", "gguf")
    _converter_tree()
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    spec = dataclasses.replace(PRESETS["tiny-gemma3"], layer_types=("local", "global") * 3, name="tiny-gemma3-p2")
    spec, w = save(spec, tmp_path / "g3", tokenizer_model)
    assert spec.layer_types == ("local", "global") * 3
    rep = run(spec, w, ["llama-cpp"], LONG)
    assert loaded_by(rep, "llama-cpp").startswith("llama.cpp's convert_hf_to_gguf.py")
    assert rep.passed is False
    named = [f for f in rep.diagnosis if f.cause == "config-value-dropped" and f.explains]
    assert named and named[0].tap == "layers.1.attn.scores", [(f.tap, f.cause) for f in rep.diagnosis]
    assert "rope_base" in named[0].evidence
    eff = rep.effective["llama-cpp@float32"]
    assert eff["sliding_window"][1] == 16  # a global layer of the checkpoint, windowed by llama.cpp


def test_the_standard_gemma3_pattern_converts_and_passes(tmp_path, tokenizer_model, monkeypatch):
    """The same converter on the period-6 pattern it assumes: PASS (the failure above is the pattern, not the
    converter path)."""
    _need("llama_cpp", "gguf")
    _converter_tree()
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    spec, w = save(PRESETS["tiny-gemma3"], tmp_path / "g3", tokenizer_model)
    rep = run(spec, w, ["llama-cpp"], LONG)
    assert loaded_by(rep, "llama-cpp").startswith("llama.cpp's convert_hf_to_gguf.py")
    assert rep.passed is True, [(f.tap, f.cause, f.evidence[:200]) for f in rep.diagnosis]


# ------------------------------------------------------------------ fallbacks, said in the run
def test_a_tokenizerless_checkpoint_falls_back_to_parity_writer(tmp_path, monkeypatch):
    _need("llama_cpp", "gguf")
    _converter_tree()
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    spec, w = save(PRESETS["tiny-gemma2"], tmp_path / "g2")  # no tokenizer.model
    rep = run(spec, w, ["llama-cpp"], SHORT)
    how = loaded_by(rep, "llama-cpp")
    assert how.startswith("parity's GGUF writer (gguf_file.py): convert_hf_to_gguf.py failed on"), how
    assert "tokenizer.model" in how, how  # the converter's own last error line
    assert rep.passed is True


def test_no_converter_tree_falls_back_and_says_so(tmp_path, monkeypatch):
    _need("llama_cpp", "gguf")
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PARITY_LLAMA_CPP", raising=False)
    spec, w = save(PRESETS["tiny-gemma2"], tmp_path / "g2")
    from parity.adapters.llama_cpp.adapter import LlamaCppAdapter

    a = LlamaCppAdapter()
    path, how = a._source(spec, w)
    assert how.startswith("parity's GGUF writer (gguf_file.py): PARITY_LLAMA_CPP is not set"), how
    monkeypatch.setenv("PARITY_LLAMA_CPP", str(tmp_path))
    how = LlamaCppAdapter()._source(spec, w)[1]
    assert f"PARITY_LLAMA_CPP={tmp_path} holds no convert_hf_to_gguf.py" in how, how


# ------------------------------------------------------------------ mlx: the loader can drop a value too
def test_mlx_lm_drops_a_transformers5_gemma3_rope_scaling(tmp_path):
    """A real finding (docs/findings.md): transformers 5 saves Gemma 3's RoPE as `rope_parameters` per layer type;
    mlx-lm 0.32.2's gemma3_text ModelArgs reads only `rope_scaling` / `rope_theta` / `rope_local_base_freq`, so
    the shipped directory loads with no linear factor on the global layers (the bases match its defaults by
    chance). Read back and named config-value-dropped (the run's first divergence is its bf16 embedding scale,
    a known choice, so the dropped factor joins that entry's evidence)."""
    _need("mlx_lm")
    spec, w = save(PRESETS["tiny-gemma3"], tmp_path / "g3")
    rep = run(spec, w, ["mlx"], SHORT)
    assert loaded_by(rep, "mlx") == f"mlx-lm's load_model({tmp_path / 'g3'})"
    eff = rep.effective["mlx@float32"]
    assert spec.rope_scaling_factor == 8.0 and eff["rope_scaling_factor"] == [1.0] * 6
    assert "rope_parameters" in eff["library"]["config_keys_not_read"]
    assert any("config-value-dropped: the spec's rope_scaling_factor" in f.evidence for f in rep.diagnosis
               if f.impl == "mlx"), [f.evidence[:300] for f in rep.diagnosis]
