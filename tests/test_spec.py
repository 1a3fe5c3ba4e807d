import json

import pytest

from parity.errors import ParityInputError
from parity.model.presets import PRESETS
from parity.model.presets import resolve_spec
from parity.model.spec import GemmaSpec, from_hf_config, load_config_json, save_config_json, to_hf_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name, tmp_path):
    spec = PRESETS[name]
    path = save_config_json(spec, tmp_path)
    assert load_config_json(path) == spec


def test_round_trip_keeps_non_hf_fields(tmp_path):
    spec = PRESETS["tiny-gemma"].replace(norm_unit_offset=False, norm_placement="sandwich", embed_scale=False)
    assert load_config_json(save_config_json(spec, tmp_path)) == spec


def test_hf_config_loads_into_transformers(tiny):
    import transformers

    cfg = transformers.GemmaConfig(**{k: v for k, v in to_hf_config(tiny).items() if k != "model_type"})
    assert cfg.head_dim == 32 and cfg.num_key_value_heads == 2 and cfg.hidden_act == "gelu_pytorch_tanh"


def test_real_gemma_2b_config_reads():
    cfg = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048,
           "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
           "head_dim": 256, "hidden_act": "gelu", "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
           "max_position_embeddings": 8192, "bos_token_id": 2}
    s = from_hf_config(cfg)
    assert s.replace(name="gemma-2b") == PRESETS["gemma-2b"].replace(gelu_approximate="none")
    assert s.gelu_approximate == "none"  # the legacy key says exact; the spec records what the file says


def test_presets_resolve_and_paths_resolve(tmp_path):
    assert resolve_spec(None) == PRESETS["tiny-gemma"]
    assert resolve_spec("gemma-7b").hidden_size == 3072
    p = save_config_json(PRESETS["tiny-gemma"], tmp_path / "c" / "config.json")
    assert resolve_spec(str(p)) == PRESETS["tiny-gemma"]


@pytest.mark.parametrize("changes,needle", [
    ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"head_dim": 31}, "odd"),
    ({"layer_types": ("global",) * 3}, "layer_types has 3"),
    ({"sliding_window": 16}, "no layer is 'local'"),
    ({"family": 1, "attn_softcap": 50.0}, "Gemma 1"),
    ({"norm_placement": "post"}, "norm_placement"),
    ({"gelu_approximate": "erf"}, "gelu_approximate"),
    ({"hidden_size": 0}, "positive integer"),
    ({"vocab_size": 2}, "bos_token_id"),
])
def test_contradictions_are_refused(changes, needle):
    with pytest.raises(ParityInputError, match=needle):
        PRESETS["tiny-gemma"].replace(**changes)


def test_bad_config_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ParityInputError, match="not valid JSON"):
        resolve_spec(str(tmp_path / "bad.json"))
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ParityInputError, match="not a Gemma"):
        resolve_spec(str(tmp_path / "llama.json"))
    (tmp_path / "short.json").write_text(json.dumps({"model_type": "gemma", "hidden_size": 8}))
    with pytest.raises(ParityInputError, match="no 'num_hidden_layers'"):
        resolve_spec(str(tmp_path / "short.json"))
    with pytest.raises(ParityInputError, match="unknown spec"):
        resolve_spec("gemma-99b")
    with pytest.raises(ParityInputError, match="unknown field"):
        GemmaSpec.from_dict({"hidden": 3})
