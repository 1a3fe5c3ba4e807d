"""`python -m parity.capture` keeps the report command's contract: every bad argument is one line, exit 2, before
any capture and with nothing left in --out; a good capture writes its traces and no spill file."""

import json
import subprocess
import sys
import time

import pytest

from parity.capture.runner import main as capture_main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import numpy as np
    from safetensors.numpy import save_file

    from parity.model.presets import PRESETS
    from parity.model.weights import random_weights, save_weights

    d = tmp_path_factory.mktemp("capture")
    save_weights(random_weights(PRESETS["tiny-gemma"]), d / "w.safetensors")
    save_file({"a": np.zeros(2, np.float32)}, str(d / "nospec.safetensors"))
    (d / "junk.safetensors").write_text("garbage")
    for name, text in {"p.json": '{"p": [2, 17, 301]}', "notjson.json": "nope", "list.json": "[2, 17]",
                       "empty.json": "{}", "floats.json": '{"p": [2, 17.0]}', "bools.json": '{"p": [true, 17]}',
                       "neg.json": '{"p": [2, -17]}', "nan.json": '{"p": [2, NaN]}', "emptyp.json": '{"p": []}',
                       "refs.json": '{"p": "missing.safetensors"}', "refsbad.json": '["a"]',
                       "refsother.json": '{"q": "x.safetensors"}'}.items():
        (d / name).write_text(text)
    (d / "latin1.json").write_bytes(b'{"p": "\xe9"}')
    (d / "afile").write_text("")
    (d / "adir").mkdir()
    return d


CASES = [
    # argparse's own errors, in one line
    (["--dtype"], "expected one argument"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--dtype", "float99"], "--dtype 'float99' is not a dtype"),
    (["--mode", "nonsense"], "'nonsense' is not a mode"),
    (["--mode", ""], "'' is not a mode"),
    (["--mode", "cumulative,cumulative"], "names a mode twice"),
    (["--mode", "decode"], "needs --continuation"),
    (["--mode", "isolated"], "needs --references"),
    (["--continuation", "[17,"], "--continuation '[17,' is not JSON"),
    (["--continuation", "[17, NaN]"], "NaN is not JSON"),
    (["--continuation", "[17, true]"], "is not a non-empty JSON list of token ids"),
    (["--continuation", "[]"], "is not a non-empty JSON list of token ids"),
    (["--continuation", "{\"a\": 1}"], "is not a non-empty JSON list of token ids"),
    (["--mode", "decode", "--continuation", "[17, 99999]"], "token id 99999 is outside the vocabulary"),
    (["--reduce-over", "-1"], "--reduce-over '-1' is not an element count"),
    (["--reduce-over", "1e6"], "--reduce-over '1e6' is not an element count"),
    (["--reduce-over", "many"], "--reduce-over 'many' is not an element count"),
    (["--out", "afile"], "is an existing file"),
    (["--out", ""], "--out '' is empty"),
    (["--out", "afile/sub"], "afile is a file); choose a directory"),
    (["--spec-json", "{bad"], "--spec-json '{bad' is not JSON"),
    (["--spec-json", "[1]"], "a spec must be a JSON object"),
    (["--spec-json", '{"hidden": 3}'], "unknown field"),
    (["--spec-json", '{"num_layers": true}'], "num_layers=True must be an integer"),
    (["--spec-json", '{"rope_base": Infinity}'], "Infinity is not JSON"),
    (["--prompts", "missing.json"], "does not exist"),
    (["--prompts", "adir"], "does not exist (a directory)"),
    (["--prompts", "notjson.json"], "is not JSON"),
    (["--prompts", "latin1.json"], "is not UTF-8"),
    (["--prompts", "list.json"], "must hold a non-empty JSON object"),
    (["--prompts", "empty.json"], "must hold a non-empty JSON object"),
    (["--prompts", "floats.json"], "prompt 'p' is not a non-empty list of token ids"),
    (["--prompts", "bools.json"], "prompt 'p' is not a non-empty list of token ids"),
    (["--prompts", "neg.json"], "prompt 'p' is not a non-empty list of token ids"),
    (["--prompts", "emptyp.json"], "prompt 'p' is not a non-empty list of token ids"),
    (["--prompts", "nan.json"], "NaN is not JSON"),
    (["--references", "missing.json"], "--references 'missing.json' does not exist"),
    (["--references", "refsbad.json"], "must hold a JSON object of prompt name -> trace file"),
    (["--mode", "isolated", "--references", "refsother.json"], "has no trace for prompt 'p'"),
    (["--mode", "isolated", "--references", "refs.json"], "does not exist; give a file written by parity capture"),
    (["--impl", "nosuch"], "unknown implementation 'nosuch'"),
    (["--weights", "missing.safetensors"], "does not exist"),
    (["--weights", "junk.safetensors"], "not a readable safetensors file"),
    (["--weights", "nospec.safetensors"], "carries no spec in its metadata; give --spec-json"),
]


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a)[:50] for a, _ in CASES])
def test_each_bad_argument_is_one_line_exit_2_and_nothing_written(files, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(files)
    base = {"--impl": "litgpt-style", "--dtype": "float32", "--weights": "w.safetensors", "--prompts": "p.json",
            "--out": "newout/sub"}
    argv = [x for kv in base.items() for x in kv if kv[0] not in args] + args
    start = time.perf_counter()
    code = capture_main(argv)
    took = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("parity: error: ") and needle in err[0], err
    assert not (files / "newout").exists()
    assert took < 10, took  # refused before any capture (a capture builds a model and runs it)


@pytest.mark.parametrize("args,needle", [
    ([], "--check needs --spec-json"),
    (["--spec-json", "{}", "--reference", "litgpt-style"], "--reference 'litgpt-style' must be impl@dtype"),
    (["--spec-json", "{}"], "no dtype given"),
    (["--spec-json", "{}", "--dtypes", "float32,float99"], "'float99' is not a dtype"),
])
def test_check_mode_bad_arguments(capsys, args, needle):
    code = capture_main(["--check", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_check_mode_good_arguments(capsys):
    from parity.model.presets import PRESETS

    code = capture_main(["--check", "--spec-json", json.dumps(PRESETS["tiny-gemma"].to_dict()), "--dtypes", "float32",
                         "--impls", "litgpt-style"])
    assert code == 0 and "litgpt-style" in json.loads(capsys.readouterr().out)["impls"]


def test_a_good_capture_writes_its_traces_and_no_spill(files, tmp_path, capsys):
    out = tmp_path / "o"
    code = capture_main(["--impl", "litgpt-style", "--dtype", "float32", "--weights", str(files / "w.safetensors"),
                         "--prompts", str(files / "p.json"), "--out", str(out), "--reduce-over", "0",
                         "--full-taps", "logits"])
    assert code == 0, capsys.readouterr().err
    assert sorted(f.name for f in out.iterdir()) == ["litgpt-style@float32.cumulative.p.safetensors"]


def test_the_module_itself_answers_in_one_line(files, tmp_path):
    """The real entry point, as the harness and users run it: no traceback on stderr."""
    proc = subprocess.run([sys.executable, "-m", "parity.capture", "--impl", "litgpt-style", "--dtype", "float32",
                           "--weights", str(files / "w.safetensors"), "--prompts", str(files / "nan.json"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o").exists()
