"""Gemma 4 from directories and at a truncated depth: what `--checkpoint DIR` and `--first-layers N` read.

* HF directories written by transformers' own `save_pretrained` (text `Gemma4ForCausalLM`, and the multimodal
  `Gemma4ForConditionalGeneration` whose text weights are `model.language_model.*`) and keras-hub presets
  written by `save_to_preset` read back to the spec and the exact weights they were made from.
* keras loads a Gemma 4 directory its own way (`from_preset`), and says when it cannot and parity's
  conversion stood in (transformers 5.25 writes the global head size only under `per_layer_config`, which
  keras-hub 0.32's converter does not read).
* `--first-layers N` is the whole model's first N layers: the per-layer embedding table and projection are
  sliced (in memory and as a view of a stored file), and transformers' forcing of the last layer to global is
  undone and said.
* An environment whose transformers has no Gemma 4 gets one line and exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.errors import ParityInputError
from parity.model.checkpoints import load_checkpoint
from parity.model.presets import PRESETS
from parity.model.spec import truncate
from parity.model.weights import load_weights, random_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]


def _same(spec, want) -> bool:
    # a directory names its spec after itself; keras-hub has no position limit (parity's 8192 stands in)
    return spec.replace(name=want.name, max_position=want.max_position) == want


def _equal_weights(got, want) -> bool:
    return set(got.tensors) == set(want.tensors) and all(
        np.array_equal(np.asarray(got.tensors[k]), np.asarray(want.tensors[k])) for k in want.tensors)


# ------------------------------------------------------------------ HF directories
@pytest.fixture(scope="module")
def hf_text(tmp_path_factory):
    """tiny-gemma4 saved by transformers' own save_pretrained, from parity's seeded weights."""
    pytest.importorskip("transformers.models.gemma4")
    from parity.adapters.hf import HFAdapter

    spec = PRESETS["tiny-gemma4"]
    w = random_weights(spec, seed=0)
    d = tmp_path_factory.mktemp("g4-hf-text")
    HFAdapter().build(spec, w, "float32").save_pretrained(d)
    return spec, w, d


def test_hf_text_directory_reads_back_the_spec_and_weights(hf_text):
    spec, w, d = hf_text
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_text" and "parity_layer_types_note" not in cfg  # as transformers writes
    got_spec, got = load_checkpoint(d)
    assert _same(got_spec, spec)
    assert _equal_weights(got, w)
    assert got.checkpoint is not None and got.checkpoint.layout == "hf"


def test_hf_multimodal_directory_reads_the_language_model(tmp_path):
    pytest.importorskip("transformers.models.gemma4")
    import transformers

    from parity.adapters.hf import HFAdapter

    spec = PRESETS["tiny-gemma4"]
    w = random_weights(spec, seed=0)
    text = HFAdapter().build(spec, w, "float32")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    cfg = transformers.Gemma4Config(text_config=HFAdapter()._config(spec).to_dict(), vision_config=vision,
                                    audio_config=None)
    mm = transformers.Gemma4ForConditionalGeneration(cfg)
    mm.model.language_model.load_state_dict(text.model.state_dict(), strict=True)
    mm.save_pretrained(tmp_path)
    from parity.model.tensor_file import TensorFile

    names = list(TensorFile(tmp_path / "model.safetensors").keys())
    assert any(n.startswith("model.language_model.layers.") for n in names)
    assert any(n.startswith("model.vision_tower.") for n in names)  # skipped, not refused
    got_spec, got = load_checkpoint(tmp_path)
    assert _same(got_spec, spec)
    assert _equal_weights(got, w)


def _resave(src: Path, dst: Path, extra: dict) -> Path:
    """The directory with tensors added to its safetensors file."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    save_file({**tensors, **extra}, dst / "model.safetensors")
    return dst


def test_kv_shared_layers_own_kv_tensors_are_ignored_as_transformers_ignores_them(hf_text, tmp_path):
    spec, w, d = hf_text
    shared = spec.first_kv_shared  # released checkpoints still carry k/v on the KV-shared layers
    hd = spec.head_dim_for(shared)
    extra = {f"model.layers.{shared}.self_attn.k_proj.weight": np.ones((spec.num_kv_heads * hd, spec.hidden_size),
                                                                        np.float32),
             f"model.layers.{shared}.self_attn.k_norm.weight": np.ones((hd,), np.float32)}
    got_spec, got = load_checkpoint(_resave(d, tmp_path / "shared", extra))
    assert _equal_weights(got, w)
    assert "2 k/v tensors of KV-shared layers not loaded" in got.source
    # the same tensor on a layer that computes its own K/V is no leftover: a mismatch, refused
    bad = {"model.layers.0.self_attn.k_proj.weight_extra": np.ones((2, 2), np.float32)}
    with pytest.raises(ParityInputError, match="does not use"):
        load_checkpoint(_resave(d, tmp_path / "bad", bad))


# ------------------------------------------------------------------ keras-hub presets
@pytest.fixture(scope="module")
def keras_adapter():
    import importlib.util

    if importlib.util.find_spec("keras_hub") is None:
        pytest.skip("keras-hub is not installed")
    from parity.adapters.keras_hub import KerasAdapter

    ad = KerasAdapter("jax")
    try:
        ad.check(PRESETS["tiny-gemma4"], "float32")
    except ParityInputError as e:  # keras already imported on another backend in this process
        pytest.skip(str(e))
    return ad


@pytest.mark.parametrize("preset", ["tiny-gemma4", "tiny-gemma4-moe"])
def test_keras_preset_reads_back_the_spec_and_weights(keras_adapter, preset, tmp_path):
    spec = PRESETS[preset]
    w = random_weights(spec, seed=0)
    keras_adapter.build(spec, w, "float32").backbone.save_to_preset(str(tmp_path))
    got_spec, got = load_checkpoint(tmp_path)
    assert _same(got_spec, spec)
    assert _equal_weights(got, w)  # the expert bank's gate/up/down/scale by keras-hub's creation order
    assert got.checkpoint.layout == "keras-hub"


def test_keras_loads_a_preset_with_its_own_from_preset(keras_adapter, tmp_path):
    spec = PRESETS["tiny-gemma4"]
    keras_adapter.build(spec, random_weights(spec, seed=0), "float32").backbone.save_to_preset(str(tmp_path))
    _, w = load_checkpoint(tmp_path)
    model = keras_adapter.build(*load_checkpoint(tmp_path), "float32")
    assert model.loading.startswith("keras-hub") and "from_preset" in model.loading
    assert model.differences == {}
    # the weights keras-hub loaded are the ones parity read
    emb = next(v for v in model.backbone.weights if v.path == "token_embedding/embeddings")
    assert np.array_equal(np.asarray(emb.numpy()), w.tensors["model.embed_tokens.weight"])
    # a capture process gets the directory with the weights file
    again = load_weights(save_weights(w, tmp_path.parent / "w.safetensors"))
    assert again.checkpoint == w.checkpoint


def test_keras_hf_directory_falls_back_to_parity_conversion_and_says_why(keras_adapter, hf_text, tmp_path):
    """transformers 5.25 writes the global head size as per_layer_config.{i}.head_dim; keras-hub 0.32's
    converter reads only `global_head_dim` and builds the global layers with the local head size."""
    spec, w, d = hf_text
    model = keras_adapter.build(*load_checkpoint(d), "float32")
    assert model.loading.startswith("parity's conversion") and "from_preset" in model.loading
    assert "ValueError" in model.loading  # the converter's own error, said in the run
    # with the key the converter reads, keras-hub loads the directory itself and builds the spec
    fixed = tmp_path / "with-global-head-dim"
    fixed.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    cfg["global_head_dim"] = spec.global_head_dim
    (fixed / "config.json").write_text(json.dumps(cfg))
    (fixed / "model.safetensors").symlink_to(d / "model.safetensors")
    model = keras_adapter.build(*load_checkpoint(fixed), "float32")
    assert model.loading.startswith("keras-hub") and model.differences == {}


# ------------------------------------------------------------------ truncated depth
@pytest.mark.parametrize("preset", ["tiny-gemma4", "tiny-gemma4-moe"])
def test_first_layers_are_the_whole_models_first_layers(preset, tmp_path):
    from parity.model.weights import PLE_PROJECTION, PLE_TABLE

    spec = PRESETS[preset]
    whole = random_weights(spec, seed=0)
    stored = load_weights(save_weights(whole, tmp_path / "w.safetensors"))
    for n in range(1, spec.num_layers):
        t = truncate(spec, n)
        assert [t.kv_source(i) for i in range(n)] == [spec.kv_source(i) for i in range(n)]
        assert t.layer_types == spec.layer_types[:n]
        cut = whole.truncated(t)
        cut.check()
        for k, v in cut.tensors.items():  # every tensor is the whole model's, the PLE parts its first n layers'
            want = whole.tensors[k]
            want = want[:, :n * spec.ple_dim] if k == PLE_TABLE else want[:n * spec.ple_dim] if k == PLE_PROJECTION \
                else want
            assert np.array_equal(v, want), k
        view = stored.truncated(t)  # the same from a stored file: a view, nothing copied
        view.check()
        assert _equal_weights(view, cut)


def test_a_truncation_that_is_not_one_is_refused():
    spec = PRESETS["tiny-gemma4"]
    other = truncate(spec, 3).replace(hidden_size=64)
    with pytest.raises(ParityInputError, match="not a truncation"):
        random_weights(spec, 0).truncated(other)


def test_hf_keeps_a_truncated_local_last_layer_and_says_so():
    pytest.importorskip("transformers.models.gemma4")
    from parity.adapters.hf import HFAdapter

    spec = truncate(PRESETS["tiny-gemma4"], 3)  # LLL: transformers would make layer 2 global
    ad = HFAdapter()
    model = ad.build(spec, random_weights(spec, 0), "float32")
    assert model.config.layer_types == ["sliding_attention"] * 3
    assert model.model.layers[2].self_attn.head_dim == spec.head_dim
    note = ad.effective(model)["library"]["layer_types"]
    assert "forces the last layer to full_attention" in note and "[2]" in note
    whole = ad._config(PRESETS["tiny-gemma4"])  # ending on a global layer: nothing to undo, nothing said
    assert not hasattr(whole, "parity_layer_types_note")


# ------------------------------------------------------------------ no Gemma 4 in this transformers
VENV53 = Path("/work/venv53/bin/python")


@pytest.mark.skipif(not VENV53.exists(), reason="no environment with transformers 5.3 (no Gemma 4) at /work/venv53")
def test_transformers_without_gemma4_gets_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PARITY_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(VENV53), "-m", "parity.report", "--spec", "tiny-gemma4", "--impls", "hf",
                        "--dtypes", "float32", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    lines = [ln for ln in r.stderr.splitlines() + r.stdout.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, lines
    # the library, its version and the fix
    assert "transformers 5.3" in lines[0] and "Gemma 4" in lines[0] and "transformers>=5.5" in lines[0], lines
