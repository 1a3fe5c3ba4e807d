"""The bad-input suite of issue 18: one table, a row per kind of bad input to the report command, each through the
in-process `parity.report.cli.main(argv)` as a user or CI job would give it. Every row asserts the contract: exit
2, exactly one line on stderr, no traceback, nothing left where --out would go (no folder, no staging folder, no
lock), and the refusal before any expensive work (timed). Then a hypothesis test feeds mutated config.json files
(the tiny presets' to-config output, a field's value or type changed, keys deleted, junk added) through
`main(["--spec", path, ...])`: a valid one runs (0 or 1), an invalid one is refused under the same contract,
never exit 3 and never a traceback.

Not repeated here: hostile plug-ins, contradicting --trace options, duplicates, corrupt traces, locks and
interrupts (tests/test_gate_contract.py); config.json field by field and resources (tests/test_bad_config.py);
`python -m parity.capture` (tests/test_capture_cli.py); the pytest plugin's options
(tests/test_plugin_options.py).
"""

import copy
import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from parity.report.cli import main

BASE = ["--impls", "litgpt-style", "--dtypes", "float32", "--quiet"]
REFUSE_WITHIN_S = 3.0  # every refusal below measured well under 1 s on a shared 2-core machine


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """The bad files the table names as @NAME. Making them imports torch and the port (through tests.variants'
    adapters): the times measure each refusal, not this interpreter's first import of torch."""
    import tests.variants  # noqa: F401
    from safetensors.numpy import save_file

    from parity.model.presets import PRESETS
    from parity.model.spec import save_config_json
    from parity.model.weights import random_weights

    d = tmp_path_factory.mktemp("bad")
    tiny = PRESETS["tiny-gemma"]
    w = random_weights(tiny, 0).tensors
    (d / "text.safetensors").write_text("not safetensors")
    shape = dict(w)
    shape["model.embed_tokens.weight"] = w["model.embed_tokens.weight"][:, :-1].copy()
    save_file(shape, str(d / "shape.safetensors"))
    up = "model.layers.0.mlp.up_proj.weight"
    nan = {**w, up: w[up].copy()}
    nan[up][0, 0] = np.nan
    save_file(nan, str(d / "nan.safetensors"))
    save_file({k: v for k, v in w.items() if k != up}, str(d / "missing.safetensors"))
    (d / "pickled").mkdir()
    (d / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never loaded
    (d / "garbage").mkdir()
    (d / "garbage" / "notes.txt").write_text("x")
    (d / "cfgonly").mkdir()
    save_config_json(tiny, d / "cfgonly")
    (d / "badjson").mkdir()
    (d / "badjson" / "config.json").write_text("{")
    (d / "badjson" / "model.safetensors").write_text("x")
    (d / "junkst").mkdir()
    save_config_json(tiny, d / "junkst")
    (d / "junkst" / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "w_toml.toml").write_text("[[waiver]\nimpl=")
    waiver = '[[waiver]]\nimpl = "hf"\ntap = "*"\ndtype = "float32"\ncause = "{cause}"\nreason = "r"\nexpires = {date}\n'
    (d / "w_cause.toml").write_text(waiver.format(cause="nope", date="2099-01-01"))
    (d / "w_date.toml").write_text(waiver.format(cause="geglu-swapped", date="2026-02-30"))
    (d / "adir").mkdir()
    return d


# (class, argv, environment, what the one line says)
CASES = [
    # token ids
    ("tokens", ["--tokens", "abc"], {}, "--tokens 'abc' is not a comma-separated list of integers"),
    ("tokens", ["--tokens", "2,1.5"], {}, "--tokens '2,1.5' is not a comma-separated list of integers"),
    ("tokens", ["--tokens", "2,-1"], {}, "token id -1 is outside the vocabulary [0, 512)"),
    ("tokens", ["--tokens", "2,,3"], {}, "--tokens '2,,3' has an empty entry"),
    ("tokens", ["--tokens", "2,3,"], {}, "has an empty entry"),
    # layers and taps
    ("layers", ["--layers", "abc"], {}, "--layers part 'abc' is not an index or range"),
    ("layers", ["--layers", "5-2"], {}, "--layers names layer 5, but the spec has 4 layers"),
    ("layers", ["--layers", "-1"], {}, "--layers names layer -1"),
    ("layers", ["--layers", ""], {}, "--layers is empty"),
    ("taps", ["--taps", "nomatch*"], {}, "--taps pattern 'nomatch*' matches no tap"),
    ("taps", ["--taps", ""], {}, "--taps is empty"),
    ("taps", ["--full-taps", " "], {}, "--full-taps is empty"),
    # the reference
    ("reference", ["--reference", "nosuch@float32"], {}, "unknown implementation 'nosuch'"),
    ("reference", ["--reference", "litgpt-style"], {}, "--reference 'litgpt-style' must be impl@dtype"),
    ("reference", ["--reference", "hf@float32@x"], {}, "'float32@x' is not a dtype"),
    ("reference", ["--reference", ""], {}, "--reference is empty"),
    # checkpoints
    ("checkpoint", ["--checkpoint", "@nowhere"], {}, "does not exist; give a checkpoint directory"),
    ("checkpoint", ["--checkpoint", "@pickled"], {}, "a pickled torch checkpoint, which parity never loads"),
    ("checkpoint", ["--checkpoint", "@pickled/pytorch_model.bin"], {}, "a pickled torch checkpoint"),
    ("checkpoint", ["--checkpoint", "@garbage"], {}, "no checkpoint layout recognised (found: notes.txt)"),
    ("checkpoint", ["--checkpoint", "@cfgonly"], {}, "no checkpoint layout recognised (found: config.json)"),
    ("checkpoint", ["--checkpoint", "@badjson"], {}, "config.json: not valid JSON"),
    ("checkpoint", ["--checkpoint", "@junkst"], {}, "model.safetensors: not a readable safetensors file"),
    # weights
    ("weights", ["--weights", "@text.safetensors"], {}, "not a readable safetensors file"),
    ("weights", ["--weights", "@shape.safetensors"], {}, "has shape (512, 95), the spec needs (512, 96)"),
    ("weights", ["--weights", "@nan.safetensors"], {}, "holds 1 NaN/inf value(s)"),
    ("weights", ["--weights", "@missing.safetensors"], {}, "1 tensor(s) the spec needs are missing"),
    ("weights", ["--weights", "@nowhere.safetensors"], {}, "does not exist"),
    ("weights", ["--weights", "@adir"], {}, "does not exist"),
    # waivers
    ("waivers", ["--waivers", "@w_toml.toml"], {}, "not valid TOML"),
    ("waivers", ["--waivers", "@w_cause.toml"], {}, "cause 'nope' is not in the catalogue"),
    ("waivers", ["--waivers", "@w_date.toml"], {}, "expires = '2026-02-30' is not a date"),
    ("waivers", ["--waivers", "@nowhere.toml"], {}, "does not exist; give an existing TOML file"),
    ("waivers", ["--waivers", "@adir"], {}, "cannot be read"),
    # decode
    ("decode", ["--decode", "-2"], {}, "--decode '-2' is not a step count; give N >= 0 or 'auto'"),
    ("decode", ["--decode", "abc"], {}, "--decode 'abc' is not a step count"),
    ("decode", ["--decode", "1.5"], {}, "--decode '1.5' is not a step count"),
    ("decode", ["--decode-tokens", "2,99999999"], {}, "token id 99999999 is outside the vocabulary"),
    # prompts without a tokenizer (random weights: bytes), and argparse's own refusals
    ("prompt", ["--prompt", "hi", "--tokens", "2,3"], {}, "argument --tokens: not allowed with argument --prompt"),
    ("argparse", ["--seed", "abc"], {}, "argument --seed: invalid int value: 'abc'"),
    ("argparse", ["--weights-profile", "heavy"], {}, "argument --weights-profile: invalid choice: 'heavy'"),
    ("argparse", ["--bogus"], {}, "unrecognized arguments: --bogus"),
    # counts and limits
    ("counts", ["--first-layers", "0"], {}, "--first-layers 0 is outside 1..4"),
    ("counts", ["--first-layers", "999"], {}, "--first-layers 999 is outside 1..4"),
    ("counts", ["--reduce-over", "-1"], {}, "--reduce-over -1 is negative"),
    ("counts", ["--noise-members", "-1"], {}, "noise_members -1 is negative"),
    ("counts", ["--timeout", "-1"], {}, "--timeout -1.0 is not a number of seconds >= 0"),
    ("counts", ["--timeout", "nan"], {}, "--timeout nan is not a number of seconds >= 0"),
    # names
    ("names", ["--spec", ""], {}, "--spec is empty"),
    ("names", ["--impls", "tests.variants:nope"], {}, "cannot load 'nope' from 'tests.variants'"),
    ("names", ["--impls", "litgpt-style,"], {}, None),  # a trailing comma: one name, said nowhere; runs (see below)
    # the environment
    ("environment", [], {"PARITY_TIMEOUT": "-1"}, "PARITY_TIMEOUT='-1' is not a number of seconds >= 0"),
    ("environment", [], {"PARITY_TIMEOUT": "abc"}, "PARITY_TIMEOUT='abc'"),
    ("environment", [], {"PARITY_STREAM": "sometimes"}, "PARITY_STREAM='sometimes'; use auto, always or never"),
    ("environment", [], {"PARITY_THREADS": "1.5"}, "PARITY_THREADS='1.5' is not a positive thread count"),
]
CASES = [c for c in CASES if c[3] is not None]


def run_main(argv, capsys):
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: its own exit, as `python -m parity.report` would give it
        code = e.code
    took = time.perf_counter() - start
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out, took


TIMES: dict[str, float] = {}


@pytest.mark.parametrize("what,args,env,needle", CASES, ids=[f"{c[0]}:{' '.join(c[1]) or list(c[2])[0]}"[:60]
                                                              for c in CASES])
def test_bad_input_is_refused_in_one_line_before_any_work(bad, tmp_path, capsys, monkeypatch, what, args, env,
                                                           needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = [str(bad / a[1:]) if a.startswith("@") else a for a in args]
    out = tmp_path / "new" / "out"
    code, err, stdout, took = run_main([*BASE, "--out", str(out), *argv], capsys)
    TIMES[" ".join(args) or str(env)] = took
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("parity: error: ") and needle in err[0], err
    assert "Traceback" not in stdout and "Traceback" not in err[0]
    assert not (tmp_path / "new").exists()  # no --out, no staging folder, no lock beside it
    assert took < REFUSE_WITHIN_S, f"refused after {took:.2f}s"


def test_the_table_covers_each_class():
    classes = {c[0] for c in CASES}
    assert classes >= {"tokens", "layers", "taps", "reference", "checkpoint", "weights", "waivers", "decode",
                       "prompt", "argparse", "counts", "names", "environment"}
    assert len(CASES) >= 50


# ------------------------------------------------------------------------------ mutated config.json files
def _bases() -> dict:
    from parity.model.presets import PRESETS
    from parity.model.spec import to_hf_config

    return {name: to_hf_config(PRESETS[name]) for name in ("tiny-gemma", "tiny-gemma2", "tiny-gemma3")}


BASES = _bases()
VALUES = (st.none() | st.booleans() | st.integers(-3, 300) | st.integers(-2**62, 2**62)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
          | st.lists(st.integers(0, 5), max_size=3) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
MUTATION = st.sampled_from(["set", "delete", "junk"])
RUN = ["--impls", "litgpt-style", "--dtypes", "float32", "--tokens", "2,5", "--first-layers", "1",
       "--noise-members", "0", "--quiet"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from(sorted(BASES)), how=st.lists(MUTATION, min_size=1, max_size=3), data=st.data())
def test_a_mutated_config_runs_or_is_refused_by_the_contract(tmp_path_factory, capsys, base, how, data):
    cfg = copy.deepcopy(BASES[base])
    for h in how:
        target = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) and data.draw(st.booleans()) else cfg
        if h == "junk":
            target[data.draw(st.text(min_size=1, max_size=8))] = data.draw(VALUES)
        elif target:
            key = data.draw(st.sampled_from(sorted(target)))
            if h == "delete":
                del target[key]
            else:
                target[key] = data.draw(VALUES)
    d = tmp_path_factory.mktemp("cfg")
    (d / "config.json").write_text(json.dumps(cfg))  # NaN and Infinity as Python writes them
    out = d / "new" / "out"
    code, err, stdout, took = run_main(["--spec", str(d / "config.json"), "--out", str(out), *RUN], capsys)
    event(f"exit {code}")
    assert code in (0, 1, 2), (code, err, cfg)  # never 3: a config is input, refused or run
    assert not any("Traceback" in line for line in err) and "Traceback" not in stdout
    if code == 2:
        assert len(err) == 1 and err[0].startswith("parity: error: "), err
        assert not (d / "new").exists()
        assert took < REFUSE_WITHIN_S, f"refused after {took:.2f}s: {err}"
    else:
        assert (out / "report.json").is_file()
