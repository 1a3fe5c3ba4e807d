"""Bad input is one line, exit 2, checked before any work, and leaves no directory behind; nothing compared is
never a PASS."""

import json

import pytest

from parity.report.cli import main as report_main
from parity.capture.runner import main as capture_main

BASE = ["--impls", "litgpt-style", "--dtypes", "float32", "--tokens", "2,17,301", "--quiet"]


@pytest.mark.parametrize("args,env,needle", [
    (["--reference", "litgpt-style@float99"], {}, "'float99' is not a dtype"),
    (["--seed", "-1"], {}, "--seed -1 is negative"),
    ([], {"PARITY_THREADS": "abc"}, "PARITY_THREADS='abc' is not a positive thread count"),
    ([], {"PARITY_THREADS": "0"}, "PARITY_THREADS='0' is not a positive thread count"),
    (["--dtypes", "float64"], {}, "nothing to compare"),
])
def test_report_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, args, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "new" / "out"
    code = report_main([*BASE, "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "new").exists()  # the directory it would have made is not left behind


def test_an_empty_prompt_is_bad_input(tmp_path, capsys):
    code = report_main(["--impls", "litgpt-style", "--dtypes", "float32", "--prompt", "", "--quiet",
                        "--out", str(tmp_path / "o")])
    assert code == 2 and "--prompt '' is empty" in capsys.readouterr().err


def test_one_trace_or_a_missing_reference_compares_nothing(tmp_path, capsys):
    assert report_main([*BASE, "--out", str(tmp_path / "a"), "--save-traces"]) == 0
    traces = sorted((tmp_path / "a" / "traces").glob("*.safetensors"))
    ref = [str(t) for t in traces if t.name.startswith("litgpt-style@float64")]
    other = [str(t) for t in traces if t.name.startswith("litgpt-style@float32")]
    capsys.readouterr()
    assert report_main(["--trace", ref[0], "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    assert report_main(["--trace", ref[0], "--trace", other[0], "--reference", "hf@float32",
                        "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "--reference hf@float32 is not among the traces" in capsys.readouterr().err
    assert report_main(["--trace", ref[0], "--trace", other[0], "--out", str(tmp_path / "d"), "--quiet"]) == 0
    data = json.loads((tmp_path / "d" / "report.json").read_text())
    assert data["status"] == "PASS" and "table-based" in data["headline"]  # no honest runs from traces


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from safetensors.numpy import save_file
    import numpy as np

    from parity.model.presets import PRESETS
    from parity.model.weights import random_weights, save_weights

    d = tmp_path_factory.mktemp("capture")
    save_weights(random_weights(PRESETS["tiny-gemma"]), d / "w.safetensors")
    save_file({"a": np.zeros(2, np.float32)}, str(d / "nospec.safetensors"))
    (d / "p.json").write_text('{"p": [2, 17, 301]}')
    (d / "vocab.json").write_text('{"p": [2, 99999]}')
    (d / "notjson.json").write_text("nope")
    (d / "afile").write_text("")
    return d


@pytest.mark.parametrize("args,needle", [
    (["--dtype", "float99"], "--dtype 'float99' is not a dtype"),
    (["--prompts", "missing.json"], "does not exist"),
    (["--prompts", "notjson.json"], "is not JSON"),
    (["--prompts", "vocab.json"], "token id 99999 is outside the vocabulary"),
    (["--out", "afile"], "is an existing file"),
    (["--mode", "nonsense"], "'nonsense' is not a mode"),
    (["--weights", "nospec.safetensors"], "carries no spec in its metadata; give --spec-json"),
])
def test_capture_bad_input_is_one_line(files, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(files)
    base = {"--impl": "litgpt-style", "--dtype": "float32", "--weights": "w.safetensors", "--prompts": "p.json",
            "--out": "newout"}
    base.update(dict(zip(args[::2], args[1::2])))
    code = capture_main([x for kv in base.items() for x in kv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (files / "newout").exists()


def test_the_library_names_fields_and_each_front_end_its_flags(tiny, tmp_path, capsys):
    from parity.errors import ParityInputError, cli_flag
    from parity.harness import Request, run
    from parity.suite.plugin import plugin_flag
    from parity.report.files import check_out_dir

    with pytest.raises(ParityInputError) as e:
        run(Request(spec=tiny, impls=["litgpt-style"], mode="sideways"))
    assert str(e.value).startswith("mode 'sideways' is not a mode") and "--" not in str(e.value)
    assert e.value.render(cli_flag).startswith("--mode 'sideways'")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ParityInputError) as e:
        check_out_dir(str(blocker / "sub"))
    assert e.value.render(plugin_flag).startswith("--parity-report-dir ")  # no str.replace on the message
    assert report_main([*BASE, "--mode", "sideways", "--out", str(tmp_path / "o")]) == 2
    assert "parity: error: --mode 'sideways' is not a mode" in capsys.readouterr().err
