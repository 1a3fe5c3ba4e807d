"""parity.model.checkpoints: real checkpoint directories, written by each library's own save function, load back
bit for bit into the canonical weights they were made from; bad directories are refused in one line."""

import json
import shutil

import numpy as np
import pytest

from parity.model.checkpoints import load_checkpoint
from parity.errors import ParityInputError
from parity.model.presets import PRESETS
from parity.model.weights import random_weights


def weights_for(preset):
    return random_weights(PRESETS[preset], seed=0)


def assert_same_spec(got, want, ignore=("name",)):
    a, b = got.to_dict(), want.to_dict()
    diff = {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}
    assert not diff, f"spec fields differ (loaded, original): {diff}"


def assert_bit_exact(got, want):
    assert sorted(got.tensors) == sorted(want.tensors)
    for k, t in want.tensors.items():
        g = got.tensors[k]
        assert g.dtype == np.float32, k
        assert g.shape == t.shape, k
        assert np.array_equal(g, t), f"{k}: max |diff| {np.abs(g - t).max()}"


def one_line_error(path, *needles):
    with pytest.raises(ParityInputError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# ------------------------------------------------------------------ HuggingFace
def hf_model(preset, dtype="float32"):
    pytest.importorskip("transformers")
    from parity.adapters import get_adapter

    return get_adapter("hf").build(PRESETS[preset], weights_for(preset), dtype)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny-gemma"
    hf_model("tiny-gemma").save_pretrained(str(d))  # transformers 5 always writes safetensors
    return d


@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_hf_round_trip(tmp_path, preset):
    hf_model(preset).save_pretrained(str(tmp_path))
    spec, w = load_checkpoint(tmp_path)
    assert_same_spec(spec, PRESETS[preset])
    assert_bit_exact(w, weights_for(preset))


def test_hf_sharded_and_bf16(tmp_path):
    model = hf_model("tiny-gemma2")
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    spec, w = load_checkpoint(tmp_path / "sharded")
    assert_same_spec(spec, PRESETS["tiny-gemma2"])
    assert_bit_exact(w, weights_for("tiny-gemma2"))

    hf_model("tiny-gemma2", "bfloat16").save_pretrained(str(tmp_path / "bf16"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert str(f.get_slice("model.norm.weight").get_dtype()) == "BF16"
    spec, w = load_checkpoint(tmp_path / "bf16" / "config.json")  # a file inside the directory works too
    assert_bit_exact(w, weights_for("tiny-gemma2"))  # the canonical weights are bf16-exact


@pytest.mark.parametrize("original_format", [True, False])
def test_hf_gemma3_multimodal(tmp_path, original_format):
    """Gemma3ForConditionalGeneration: text weights under language_model.model.* (transformers 5's saved
    format) or model.language_model.* (its in-memory names); the vision tower is skipped."""
    transformers = pytest.importorskip("transformers")
    import torch

    from parity.model.spec import to_hf_config

    spec = PRESETS["tiny-gemma3"]
    text = {k: v for k, v in to_hf_config(spec).items() if k not in ("parity", "architectures")}
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=5, boi_token_index=3, eoi_token_index=4)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    want = weights_for("tiny-gemma3")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in want.tensors.items():
            params[k.replace("model.", "model.language_model.", 1)].copy_(torch.from_numpy(t))
    model.save_pretrained(str(tmp_path), save_original_format=original_format)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        prefix = "language_model.model." if original_format else "model.language_model."
        assert any(k.startswith(prefix) for k in f.keys()) and any("vision_tower" in k for k in f.keys())
    got, w = load_checkpoint(tmp_path)
    assert_same_spec(got, spec)
    assert_bit_exact(w, want)


def test_end_to_end_report_passes(hf_dir):
    from parity.harness import Request, run

    spec, w = load_checkpoint(hf_dir)
    report = run(Request(spec=spec, weights=w, impls=["litgpt-style", "hf"], dtypes=["float32"],
                         prompts={"p": [2, 5, 9]}))
    assert report.passed is True
    assert {(r.impl, r.dtype) for r in report.runs} == {("litgpt-style", "float32"), ("hf", "float32")}
    assert report.results and not report.skipped
    assert report.weights_source == f"{hf_dir} (hf)"
    assert report.weights_hash == weights_for("tiny-gemma").hash  # the very numbers it was saved from


# -------------------------------------------------------------------- keras-hub
@pytest.fixture(scope="module")
def keras_adapter():
    import importlib.util

    if importlib.util.find_spec("keras_hub") is None:  # not importorskip: the adapter picks keras' backend
        pytest.skip("keras-hub is not installed")
    from parity.adapters import get_adapter

    adapter = get_adapter("keras")
    if adapter.needs_own_process():
        pytest.skip("keras is loaded on another backend in this process")
    return adapter


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_keras_preset_round_trip(tmp_path, keras_adapter, dtype):
    model = keras_adapter.build(PRESETS["tiny-gemma"], weights_for("tiny-gemma"), dtype)
    model.backbone.save_to_preset(str(tmp_path / "single"))
    model.backbone.save_to_preset(str(tmp_path / "sharded"), max_shard_size=0.0004)  # GB: ~3 shards
    keras_adapter.release(model)
    assert (tmp_path / "single" / "model.weights.h5").is_file()
    assert (tmp_path / "sharded" / "model.weights.json").is_file()
    for d in ("single", "sharded"):
        spec, w = load_checkpoint(tmp_path / d)
        assert spec.max_position == 8192  # keras-hub has no position limit: Gemma's context length
        assert_same_spec(spec, PRESETS["tiny-gemma"], ignore=("name", "max_position"))
        assert_bit_exact(w, weights_for("tiny-gemma"))


def test_keras_gemma2_preset(tmp_path, keras_adapter):
    """keras-hub's GemmaBackbone in its Gemma 2 configuration (post norms, softcaps, even-layer windows)."""
    from parity.adapters.keras_hub import to_keras_layout
    from parity.model.checkpoints import keras_name_map
    from parity.model.weights import map_weights

    _, hub = keras_adapter._import()
    spec, want = PRESETS["tiny-gemma2"], weights_for("tiny-gemma2")
    backbone = hub.models.GemmaBackbone(
        vocabulary_size=spec.vocab_size, num_layers=spec.num_layers, num_query_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, hidden_dim=spec.hidden_size,
        intermediate_dim=2 * spec.intermediate_size, head_dim=spec.head_dim, query_head_dim_normalize=True,
        use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=spec.attn_softcap,
        final_logit_soft_cap=spec.final_softcap, use_sliding_window_attention=True,
        sliding_window_size=spec.sliding_window, dtype="float32")
    variables = {v.path: v for v in backbone.weights}
    mapped = map_weights(to_keras_layout(want.tensors, spec), keras_name_map(spec),
                         {p: tuple(v.shape) for p, v in variables.items()}, where="test")
    for p, v in variables.items():
        v.assign(mapped[p])
    backbone.save_to_preset(str(tmp_path))
    got, w = load_checkpoint(tmp_path)
    assert_same_spec(got, spec, ignore=("name", "max_position"))
    assert_bit_exact(w, want)


def test_keras_gemma3_preset(tmp_path, keras_adapter):
    """keras-hub's Gemma3Backbone (text only: qk-norm, 5 local : 1 global, linear global rope factor)."""
    from parity.errors import Unsupported

    spec, want = PRESETS["tiny-gemma3"], weights_for("tiny-gemma3")
    try:
        model = keras_adapter.build(spec, want, "float32")
    except Unsupported as e:
        pytest.skip(f"this keras adapter builds no Gemma 3: {e}")
    model.backbone.save_to_preset(str(tmp_path))
    keras_adapter.release(model)
    assert json.loads((tmp_path / "config.json").read_text())["class_name"] == "Gemma3Backbone"
    got, w = load_checkpoint(tmp_path)
    assert_same_spec(got, spec, ignore=("name", "max_position"))
    assert_bit_exact(w, want)


# ----------------------------------------------------------------------- litgpt
@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_litgpt_round_trip(tmp_path, preset):
    pytest.importorskip("litgpt")
    from litgpt.utils import save_config
    from safetensors.torch import save_file

    from parity.adapters import get_adapter

    model = get_adapter("litgpt").build(PRESETS[preset], weights_for(preset), "float32")
    save_config(model.config, tmp_path)  # litgpt's own model_config.yaml
    save_file(model.state_dict(), str(tmp_path / "lit_model.safetensors"))
    spec, w = load_checkpoint(tmp_path)
    assert_same_spec(spec, PRESETS[preset])
    assert_bit_exact(w, weights_for(preset))


def lit_dir(tmp_path, preset, layout):
    """A litgpt directory without litgpt: its parameter names and model_config.yaml fields, written here."""
    import yaml
    from safetensors.numpy import save_file

    from parity.adapters.litgpt_pkg import NAME_MAP_PRE, NAME_MAP_SANDWICH, QKV_TARGET, fuse_qkv
    from parity.model.weights import map_weights

    spec, w = PRESETS[preset], weights_for(preset)
    tensors = fuse_qkv(w.tensors, spec, layout)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    base = NAME_MAP_SANDWICH if spec.norm_placement == "sandwich" else NAME_MAP_PRE
    name_map = {**base, "model.layers.{}.self_attn.qkv.weight": QKV_TARGET[layout]}
    shapes = {}
    for k, t in tensors.items():
        i = k.split(".")[2] if k.startswith("model.layers.") else None
        key = k.replace(f".{i}.", ".{}.", 1) if i else k
        shapes[name_map[key].format(i) if i else name_map[key]] = t.shape
    save_file(map_weights(tensors, name_map, shapes, where="test"), str(tmp_path / "lit_model.safetensors"))
    cfg = dict(name="Gemma-tiny", n_layer=spec.num_layers, n_embd=spec.hidden_size, n_head=spec.num_heads,
               n_query_groups=spec.num_kv_heads, head_size=spec.head_dim, vocab_size=spec.vocab_size,
               padded_vocab_size=spec.vocab_size, block_size=spec.max_position,
               intermediate_size=spec.intermediate_size, norm_eps=spec.norm_eps, norm_class_name="RMSNorm",
               mlp_class_name="GemmaMLP", gelu_approximate="tanh", parallel_residual=False, bias=False,
               rotary_percentage=1.0, rope_base=int(spec.rope_base), scale_embeddings=True,
               post_attention_norm=spec.norm_placement == "sandwich",
               post_mlp_norm=spec.norm_placement == "sandwich",
               attention_scores_scalar=spec.query_pre_attn_scalar,
               attention_logit_softcapping=spec.attn_softcap, final_logit_softcapping=spec.final_softcap)
    if spec.sliding_window:
        cfg.update(sliding_window_size=spec.sliding_window, sliding_window_layer_placing="interleaved")
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


@pytest.mark.parametrize("layout", ["grouped", "stacked"])
def test_litgpt_layouts_without_litgpt(tmp_path, layout):
    """litgpt 0.4 (attn.attn, per kv group) and 0.5 (attn.qkv, [Q; K; V]) fused projections split back."""
    spec, w = load_checkpoint(lit_dir(tmp_path, "tiny-gemma2", layout))
    assert_same_spec(spec, PRESETS["tiny-gemma2"])
    assert_bit_exact(w, weights_for("tiny-gemma2"))


# ------------------------------------------------------------------- bad inputs
def test_pickles_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"model.norm.weight": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    one_line_error(tmp_path, "pytorch_model.bin", "convert to safetensors")
    one_line_error(tmp_path / "pytorch_model.bin", "pytorch_model.bin", "convert to safetensors")

    lit = tmp_path / "lit"
    lit.mkdir()
    torch.save({}, lit / "lit_model.pth")
    (lit / "model_config.yaml").write_text("name: Gemma-2b\n")
    one_line_error(lit, "lit_model.pth", "convert to safetensors")


def test_sharded_index_problems(tmp_path):
    hf_model("tiny-gemma").save_pretrained(str(tmp_path / "a"), max_shard_size="100KB")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    index_path = tmp_path / "a" / "model.safetensors.index.json"
    shard = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))[-1]
    (tmp_path / "a" / shard).unlink()
    one_line_error(tmp_path / "a", shard, "missing")

    index_path = tmp_path / "b" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = shard  # listed in a shard that lacks it
    if json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"][
            "model.layers.0.mlp.up_proj.weight"] == shard:
        index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = sorted(set(index["weight_map"].values()))[0]
    index_path.write_text(json.dumps(index))
    one_line_error(tmp_path / "b", "model.layers.0.mlp.up_proj.weight", "does not hold it")


def test_nan_and_shape_mismatch(tmp_path, hf_dir):
    from safetensors.numpy import save_file

    d = tmp_path / "nan"
    shutil.copytree(hf_dir, d)
    tensors = dict(weights_for("tiny-gemma").tensors)
    bad = tensors["model.layers.2.mlp.down_proj.weight"].copy()
    bad[3, 4] = np.nan
    tensors["model.layers.2.mlp.down_proj.weight"] = bad
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    one_line_error(d, "model.layers.2.mlp.down_proj.weight", "NaN")

    d = tmp_path / "shape"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    one_line_error(d, "mlp", "(256, 96)", "(128, 96)")

    d = tmp_path / "truncated"
    shutil.copytree(hf_dir, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(d, "model.safetensors", "re-export")


def test_unknown_layouts(tmp_path):
    one_line_error(tmp_path, "no checkpoint layout", "model.safetensors", "model.weights.h5",
                   "lit_model.safetensors")
    one_line_error(tmp_path / "nowhere", "does not exist")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    one_line_error(tmp_path, "found: config.json")

    keras = tmp_path / "keras"
    keras.mkdir()
    (keras / "config.json").write_text(json.dumps({"module": "keras_hub.src.models.llama.llama_backbone",
                                                   "class_name": "LlamaBackbone", "config": {}}))
    (keras / "model.weights.h5").write_bytes(b"")
    one_line_error(keras, "LlamaBackbone", "HuggingFace")

    lit = tmp_path / "lit"
    lit.mkdir()
    (lit / "model_config.yaml").write_text("name: x\nn_layer: 1\nmlp_class_name: LLaMAMLP\n")
    (lit / "lit_model.safetensors").write_bytes(b"")
    one_line_error(lit, "mlp_class_name", "LLaMAMLP")


def test_litgpt_untied_head_and_unknown_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = lit_dir(tmp_path, "tiny-gemma", "stacked")
    tensors = load_file(str(d / "lit_model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][::-1].copy()  # no longer the embedding
    save_file(tensors, str(d / "lit_model.safetensors"))
    spec, w = load_checkpoint(d)
    assert spec.tied_head is False
    assert np.array_equal(w.tensors["lm_head.weight"], weights_for("tiny-gemma").tensors[
        "model.embed_tokens.weight"][::-1])

    tensors["transformer.h.0.attn.lora_A.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(d / "lit_model.safetensors"))
    one_line_error(d, "transformer.h.0.attn.lora_A.weight", "model_config.yaml")
