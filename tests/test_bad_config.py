"""A config.json's values are read by type, field by field: every bad value is one line naming the field (exit 2),
never coerced (64.7 is not 64, true is not 1 layer), never an internal error, and refused before any work. Sizes
the machine cannot hold are refused by an up-front estimate, PARITY_THREADS by its bounds.

Each check is shown failing on the bad input (the table) and passing on good input (the presets, real-shaped
Gemma 2 and Gemma 3 multimodal config.json files)."""

import copy
import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.errors import ParityInputError
from parity.model.presets import PRESETS
from parity.model.spec import GemmaSpec, from_hf_config, load_config_json, save_config_json, to_hf_config
from parity.report.cli import main as report_main

GEMMA2 = {  # google/gemma-2-2b's config.json
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000,
}
GEMMA3 = {  # google/gemma-3-4b-it's shape, its text_config written out in full
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256,
    "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "sliding_window": 1024, "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "max_position_embeddings": 131072,
    },
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
}
TINY = to_hf_config(PRESETS["tiny-gemma"])
TINY2 = to_hf_config(PRESETS["tiny-gemma2"])
BASES = {"gemma2": GEMMA2, "gemma3": GEMMA3, "tiny": TINY, "tiny2": TINY2}
NAN, INF = float("nan"), float("inf")


def mutated(base: str, key: str, value) -> dict:
    """`base` with the dotted `key` set to `value` (the sentinel DELETE removes it)."""
    cfg = copy.deepcopy(BASES[base])
    *path, last = key.split(".")
    d = cfg
    for k in path:
        d = d[k]
    if value is DELETE:
        del d[last]
    else:
        d[last] = value
    return cfg


class _Delete:
    """The key removed from the config (its repr is stable: test ids must match across xdist workers)."""

    def __repr__(self) -> str:
        return "<deleted>"


DELETE = _Delete()

# (base config, dotted field, bad value, what the one line must say besides the field)
CASES = [
    # sizes: integers, positive, not bool, not fractional, not strings, not absurd
    ("tiny", "hidden_size", 64.7, "not an integer"),
    ("tiny", "hidden_size", 64.0, "not an integer"),
    ("tiny", "hidden_size", "96", "not an integer"),
    ("tiny", "hidden_size", 0, "outside 1.."),
    ("tiny", "hidden_size", -96, "outside 1.."),
    ("tiny", "hidden_size", 1e9, "not an integer"),  # JSON 1e9 is a float
    ("tiny", "num_hidden_layers", True, "not an integer"),
    ("tiny", "num_hidden_layers", 10**7, "outside 1..4096"),
    ("tiny", "num_hidden_layers", None, "not an integer"),
    ("tiny", "vocab_size", 10**12, "outside 1..2147483647"),
    ("tiny", "vocab_size", [512], "not an integer"),
    ("tiny", "intermediate_size", 256.5, "not an integer"),
    ("tiny", "num_attention_heads", False, "not an integer"),
    ("tiny", "num_key_value_heads", 3, "does not divide num_attention_heads=4"),
    ("tiny", "num_key_value_heads", 0, "outside 1.."),
    ("tiny", "head_dim", 31, "is odd"),
    ("tiny", "head_dim", "32", "not an integer"),
    ("tiny", "max_position_embeddings", 512.0, "not an integer"),
    ("tiny", "bos_token_id", 512, "outside the vocabulary"),
    ("tiny", "bos_token_id", -1, "outside 0.."),
    ("tiny", "bos_token_id", "2", "not an integer or null"),
    # floats: numbers, finite, positive
    ("tiny", "rms_norm_eps", NAN, "not finite"),
    ("tiny", "rms_norm_eps", "1e-6", "not a number"),
    ("tiny", "rms_norm_eps", 0.5, "must be below 0.1"),
    ("tiny", "rms_norm_eps", 0, "must be positive"),
    ("tiny", "rope_theta", INF, "not finite"),
    ("tiny", "rope_theta", -10000.0, "must be positive"),
    ("tiny", "rope_theta", True, "not a number"),
    ("tiny2", "final_logit_softcapping", NAN, "not finite"),
    ("tiny2", "attn_logit_softcapping", -INF, "not finite"),
    ("tiny2", "attn_logit_softcapping", "50", "not a number or null"),
    ("tiny2", "query_pre_attn_scalar", 0, "must be positive"),
    ("gemma3", "text_config.rope_scaling.factor", INF, "not finite"),
    ("gemma3", "text_config.rope_local_base_freq", "1e4", "not a number"),
    # nullable where HF allows None, and only there
    ("tiny2", "sliding_window", "512", "not an integer or null"),
    ("tiny2", "sliding_window", 0, "outside 1.."),
    ("tiny2", "sliding_window", None, "is null but some layers use sliding attention"),
    ("gemma2", "sliding_window", 4096.5, "not an integer or null"),
    ("gemma3", "text_config", None, "not a JSON object"),
    ("gemma3", "text_config", [1, 2], "not a JSON object"),
    ("gemma3", "text_config.rope_scaling", "linear", "not a JSON object"),
    # booleans: JSON true/false, not strings or numbers
    ("tiny", "tie_word_embeddings", "false", "not a boolean"),
    ("tiny", "tie_word_embeddings", 0, "not a boolean"),
    ("tiny", "parity", {"norm_unit_offset": "no"}, "not a boolean"),
    # enums from their sets
    ("tiny", "hidden_activation", "relu", "is not a GELU"),
    ("tiny", "hidden_activation", 3, "is not a GELU"),
    ("gemma2", "layer_types", ["full_attention"] * 25 + ["chunked_attention"], "not a list of layer types"),
    ("gemma2", "layer_types", ["full_attention"] * 3, "does not have num_hidden_layers=26"),
    ("gemma2", "layer_types", "sliding_attention", "not a list of layer types"),
    ("gemma3", "text_config.rope_scaling", {"rope_type": "yarn", "factor": 8.0}, "is not allowed"),
    ("tiny", "parity", {"norm_placement": "post"}, "is not allowed"),
    ("tiny", "parity", {"norm_unit_ofset": False}, "not a field parity knows"),
    ("tiny", "parity", "sandwich", "not a JSON object"),
    # required fields
    ("tiny", "vocab_size", DELETE, "has no 'vocab_size'"),
    ("gemma3", "text_config.hidden_size", DELETE, "has no 'text_config.hidden_size'"),
]


def _field(key: str, value) -> str:
    if key == "parity" and isinstance(value, dict):
        return next(iter(value))
    return key


@pytest.mark.parametrize("base,key,value,needle", CASES, ids=[f"{b}-{k}={v!r}"[:60] for b, k, v, _ in CASES])
def test_each_bad_value_is_refused_naming_its_field(base, key, value, needle):
    with pytest.raises(ParityInputError) as e:
        from_hf_config(mutated(base, key, value))
    msg = str(e.value)
    assert "\n" not in msg and _field(key, value) in msg and needle in msg, msg


def test_the_table_covers_each_family_of_fields():
    assert len(CASES) >= 30
    needles = " ".join(n for *_, n in CASES)
    for family in ("not an integer", "not finite", "not a number", "not a boolean", "is not allowed", "null",
                   "not a JSON object", "has no"):
        assert family in needles


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "tiny", "tiny2"])
def test_good_configs_read(name):
    spec = from_hf_config(copy.deepcopy(BASES[name]))
    assert isinstance(spec, GemmaSpec)


def test_real_shapes_read_as_their_numbers():
    s2 = from_hf_config(copy.deepcopy(GEMMA2))
    assert (s2.hidden_size, s2.num_layers, s2.final_softcap, s2.sliding_window) == (2304, 26, 30.0, 4096)
    assert s2.layer_types[:2] == ("local", "global")
    s3 = from_hf_config(copy.deepcopy(GEMMA3))
    assert (s3.family, s3.hidden_size, s3.rope_scaling_factor, s3.rope_local_base) == (3, 2560, 8.0, 10000.0)
    assert s3.layer_types[5] == "global" and s3.final_softcap is None and s3.qk_norm


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_the_checked_reader(name, tmp_path):
    assert load_config_json(save_config_json(PRESETS[name], tmp_path)) == PRESETS[name]


# ------------------------------------------------------------------ the file itself
@pytest.mark.parametrize("text,needle", [
    ('{"model_type": "gemma", "hidden_size": NaN}', "hidden_size=NaN is not a finite number"),
    ('{"model_type": "gemma", "initializer_range": -Infinity}', "initializer_range=-Infinity is not a finite"),
    ('{"model_type": "gemma", "rope_scaling": {"factor": Infinity}}', "rope_scaling.factor=Infinity"),
    ('{"model_type": "gemma", "eos_token_id": [1, 1e400]}', "eos_token_id[1]=inf is not a finite"),
    ('{"model_type": "gemma",\n "hidden_size": 96,,}', "not valid JSON at line 2 column"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("null", "holds a JSON NoneType, not an object"),
    ('"config"', "holds a JSON str, not an object"),
    ("[" * 100000, "nested too deeply"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, text, needle):
    p = tmp_path / "config.json"
    p.write_text(text)
    with pytest.raises(ParityInputError) as e:
        load_config_json(p)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_paths_are_refused(tmp_path):
    with pytest.raises(ParityInputError, match="does not exist"):
        load_config_json(tmp_path / "missing.json")
    with pytest.raises(ParityInputError, match="a directory without a config.json"):
        load_config_json(tmp_path)
    (tmp_path / "latin1.json").write_bytes(b'{"model_type": "gemma", "name": "\xe9"}')
    with pytest.raises(ParityInputError, match="not UTF-8"):
        load_config_json(tmp_path / "latin1.json")
    save_config_json(PRESETS["tiny-gemma"], tmp_path)  # the directory now holds one: good input
    assert load_config_json(tmp_path) == PRESETS["tiny-gemma"]


# ------------------------------------------------------------------ the spec itself (also --spec-json, traces)
@pytest.mark.parametrize("changes,needle", [
    ({"tied_head": 1}, "tied_head=1 is not a boolean"),
    ({"qk_norm": "false"}, "qk_norm='false' is not a boolean"),
    ({"final_softcap": NAN, "family": 2, "norm_placement": "sandwich"}, "final_softcap=nan is not a finite"),
    ({"rope_base": INF}, "rope_base=inf is not a finite"),
    ({"hidden_size": 64.0}, "hidden_size=64.0 must be a positive integer"),
    ({"num_layers": True}, "num_layers=True must be an integer"),
    ({"num_layers": 10**12}, "num_layers=1000000000000 must be an integer in 1..4096"),
    ({"bos_token_id": -1}, "bos_token_id=-1 must be a token id"),
    ({"layer_types": "global"}, "layer_types='global' is not a list"),
    ({"name": 3}, "name=3 is not a string"),
])
def test_the_spec_refuses_what_the_config_reader_would(changes, needle):
    d = {**PRESETS["tiny-gemma"].to_dict(), **changes}
    d.pop("layer_types") if "layer_types" not in changes else None
    with pytest.raises(ParityInputError) as e:
        GemmaSpec.from_dict(d)
    assert needle in str(e.value), str(e.value)


def test_a_spec_that_is_not_an_object_is_refused():
    with pytest.raises(ParityInputError, match="not list"):
        GemmaSpec.from_dict([1, 2])


# ------------------------------------------------------------------ mutated files, any value
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(sorted(BASES)), data=st.data(), value=JSON_VALUES)
def test_any_mutated_config_reads_or_is_refused_in_one_line(tmp_path_factory, base, data, value):
    """Whatever value any field gets, the reader returns a spec or refuses in one line: never another error."""
    cfg = copy.deepcopy(BASES[base])
    target = cfg["text_config"] if "text_config" in cfg and data.draw(st.booleans()) else cfg
    key = data.draw(st.sampled_from(sorted(target)))
    target[key] = value
    p = tmp_path_factory.mktemp("m") / "config.json"
    p.write_text(json.dumps(cfg))  # NaN/Infinity as Python writes them
    try:
        spec = load_config_json(p)
    except ParityInputError as e:
        assert "\n" not in str(e) and len(str(e)) < 400
        return
    for f in ("norm_eps", "rope_base", "rope_scaling_factor"):
        assert math.isfinite(getattr(spec, f))
    for f in ("hidden_size", "vocab_size", "num_layers", "intermediate_size", "head_dim"):
        assert type(getattr(spec, f)) is int and getattr(spec, f) > 0


# ------------------------------------------------------------------ through the real command
CLI = ["--impls", "litgpt-style", "--dtypes", "float32", "--quiet"]


@pytest.mark.parametrize("key,value", [
    ("sliding_window", "512"), ("hidden_size", 64.7), ("num_hidden_layers", True), ("final_logit_softcapping", NAN),
    ("text_config", None),
])
def test_the_report_command_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, key, value):
    cfg = copy.deepcopy(GEMMA3 if key == "text_config" else TINY2)
    cfg[key] = value
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    out = tmp_path / "new" / "out"
    code = report_main(["--spec", str(tmp_path / "bad.json"), "--out", str(out), *CLI])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and key in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ resources, before any weight is made
def test_an_absurd_size_is_refused_up_front_with_the_estimate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    for key, value in (("hidden_size", 10**9), ("vocab_size", 2 * 10**9)):
        cfg = {**TINY, key: value}
        (tmp_path / "huge.json").write_text(json.dumps(cfg))
        start = time.perf_counter()
        code = report_main(["--spec", str(tmp_path / "huge.json"), "--out", str(tmp_path / "new" / "out"), *CLI])
        took = time.perf_counter() - start
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert "of memory in one process" in err[0] and "--first-layers" in err[0] and "--allow-large" in err[0]
        assert took < 5, took
        assert not (tmp_path / "new").exists() and not (tmp_path / "cache").exists()  # no weights, no .part


def test_the_estimate_passes_real_shapes_and_refuses_a_full_disk(tmp_path, monkeypatch):
    from parity.model import resources
    from parity.model.weights import param_count

    monkeypatch.delenv("PARITY_ALLOW_LARGE", raising=False)
    for spec in PRESETS.values():  # one layer's formula agrees with the weights' own count
        embed = spec.vocab_size * spec.hidden_size * (1 if spec.tied_head else 2)
        layers = sum(resources.layer_params(spec, i) for i in range(spec.num_layers)) if spec.family == 4 \
            else spec.num_layers * resources.layer_params(spec)
        assert param_count(spec) == embed + layers + resources.ple_params(spec) + spec.hidden_size
    tiny = resources.estimate(PRESETS["tiny-gemma"], ["float32", "float64"], 64, True, None)
    resources.check(tiny)  # good input passes
    big = resources.estimate(PRESETS["gemma-2b"], ["bfloat16", "float64"], 128, False, None)
    assert big.memory < 8e9  # streamed: the embedding and one layer in float64, not all 20 GB
    full = resources.Estimate(params=10**12, memory=1, memory_what="", disk=10**18,
                              disk_at=tmp_path / "weights" / "w.safetensors")
    with pytest.raises(ParityInputError, match=r"need 1000.0 PB on disk at .*weights but .* is free"):
        resources.check(full)
    resources.check(full, allow=True)  # the override, for those who know better
    monkeypatch.setenv("PARITY_ALLOW_LARGE", "1")
    resources.check(full)
    monkeypatch.setenv("PARITY_ALLOW_LARGE", "yes")
    with pytest.raises(ParityInputError, match="PARITY_ALLOW_LARGE='yes'; set it to 1"):
        resources.check(full)


# ------------------------------------------------------------------ PARITY_THREADS
@pytest.mark.parametrize("value", ["100000", "-1", "0", "1.5", "", "two", "1e3", "٣"])
def test_thread_counts_out_of_bounds_are_refused(monkeypatch, value):
    from parity.adapters.torch_setup import threads

    monkeypatch.setenv("PARITY_THREADS", value)
    with pytest.raises(ParityInputError, match="is not a positive thread count up to"):
        threads()


def test_thread_counts_in_bounds_pass(monkeypatch):
    import os

    from parity.adapters.torch_setup import threads

    for value in ("1", str(os.cpu_count()), str(4 * os.cpu_count())):
        monkeypatch.setenv("PARITY_THREADS", value)
        assert threads() == int(value)


def test_a_huge_thread_count_is_exit_2_not_a_segfault(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PARITY_THREADS", "100000")
    code = report_main(["--out", str(tmp_path / "o"), *CLI])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "PARITY_THREADS='100000'" in err[0] and not (tmp_path / "o").exists()
