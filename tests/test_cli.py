"""`python -m parity.report`: exit codes, files written, and one-line errors on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.report.cli import main
from parity.model.weights import random_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--impls", "litgpt-style,hf", "--quiet", "--tokens", "2,17,301,5,88"]


def test_agreeing_run_exits_0_and_writes_json_and_markdown(tmp_path, capsys):
    assert main(FAST + ["--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["passed"] is True and data["first_divergence"] is None
    assert data["reference"] == "litgpt-style@float64"
    assert {(r["impl"], r["dtype"]) for r in data["runs"]} >= {("hf", "float32"), ("hf", "bfloat16")}
    keys = {"impl", "dtype", "mode", "tap", "layer", "max_abs", "max_rel", "atol", "rtol", "passed"}
    assert keys <= set(data["taps"][0])
    assert (tmp_path / "report.md").read_text().startswith("## parity: ✅ PASS")
    assert "PASS" in capsys.readouterr().out


def test_layers_and_taps_select(tmp_path):
    assert main(FAST + ["--out", str(tmp_path), "--layers", "1-2", "--taps", "layers.*.mlp.act,logits",
                        "--dtypes", "float32"]) == 0
    taps = {t["tap"] for t in json.loads((tmp_path / "report.json").read_text())["taps"]}
    assert taps == {"layers.1.mlp.act", "layers.2.mlp.act", "logits"}


def test_exact_gelu_implementation_fails_and_points_at_its_mlp(tmp_path):
    """End to end, as a user would: a plug-in implementation with exact GELU, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "parity.report", "--impls", "hf,tests.variants:exact_gelu", "--dtypes", "float32",
         "--quiet", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["first_divergence"]["impl"] == "exact-gelu"
    assert data["first_divergence"]["tap"] == "layers.0.mlp.act"
    assert [d["cause"] for d in data["diagnosis"] if d["impl"] == "exact-gelu"][0] == "gelu-exact"
    assert "gelu-exact" in proc.stdout


def test_swapped_geglu_fails_with_its_cause(tmp_path):
    assert main(["--impls", "tests.variants:swapped_geglu", "--quiet", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["first_divergence"]["tap"] == "layers.0.mlp.act"
    assert {d["cause"] for d in data["diagnosis"]} == {"geglu-swapped"}
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("## parity: ❌ FAIL") and "geglu-swapped" in md.split("\n")[2]


def _bad_inputs(tmp_path):
    (tmp_path / "bad.json").write_text("{oops")
    other = random_weights(__import__("importlib").import_module("parity.model.presets").PRESETS["tiny-gemma"].replace(num_layers=2))
    save_weights(other, tmp_path / "other.safetensors")
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("x")
    return [
        (["--spec", "gemma-99b"], "unknown spec"),
        (["--impls", "nope"], "unknown implementation"),
        (["--spec", str(tmp_path / "bad.json")], "not valid JSON"),
        (["--weights", str(tmp_path / "other.safetensors")], "missing"),
        (["--tokens", "2,99999"], "outside the vocabulary"),
        (["--tokens", ""], "empty"),
        (["--tokens", "2,x"], "not a comma-separated list"),
        (["--layers", "7"], "has 4 layers"),
        (["--layers", "1-x"], "not an index or range"),
        (["--taps", "layers.0.nope"], "matches no tap"),
        (["--dtypes", "float8"], "unknown dtype"),
        (["--mode", "sideways"], "not a mode"),
        (["--out", str(ro / "file" / "sub")], "cannot be written"),
        (["--impls", "no_such_module:factory"], "cannot load"),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    for args, needle in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        code = main(["--impls", "litgpt-style", "--quiet", "--out", str(out)] + args)
        err = capsys.readouterr().err.strip()
        assert code == 2, (args, err)
        assert needle in err and len(err.splitlines()) == 1, (args, err)
        assert not (out / "report.json").exists(), args


def test_missing_optional_backend_is_exit_2(tmp_path):
    """keras-hub made unimportable (as on a machine without it): a one-line error naming the install."""
    blocker = tmp_path / "block"
    for pkg in ("keras_hub", "keras_nlp"):
        (blocker / pkg).mkdir(parents=True)
        (blocker / pkg / "__init__.py").write_text(f"raise ImportError('No module named {pkg}')\n")
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, "-m", "parity.report", "--impls", "keras", "--quiet", "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pip install" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "report.json").exists()


def test_checkpoint_directory_runs_the_same_report(tmp_path, tiny, tiny_weights):
    from parity.adapters import get_adapter

    model = get_adapter("hf").build(tiny, tiny_weights, "float32")
    model.save_pretrained(tmp_path / "ckpt")
    code = main(["--checkpoint", str(tmp_path / "ckpt"), "--impls", "litgpt-style,hf", "--dtypes", "float32",
                 "--tokens", "2,5,9", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 0
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["weights"]["hash"] == tiny_weights.hash and data["spec"]["hidden_size"] == tiny.hidden_size


def test_pickled_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    code = main(["--checkpoint", str(tmp_path / "ckpt"), "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "safetensors" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "report.json").exists()


def test_waivers_make_an_accepted_divergence_pass_and_say_so(tmp_path):
    import json

    from parity.report.cli import main

    waivers = tmp_path / "w.toml"
    waivers.write_text('[[waiver]]\nimpl = "swapped-geglu"\ntap = "*"\ndtype = "*"\ncause = "geglu-swapped"\n'
                       'reason = "known, fix pending"\nexpires = 2999-01-01\n')
    args = ["--impls", "tests.variants:swapped_geglu", "--dtypes", "float32", "--tokens", "2,17,301,5", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 1
    assert main(args + ["--out", str(tmp_path / "b"), "--waivers", str(waivers)]) == 0
    data = json.loads((tmp_path / "b" / "report.json").read_text())
    assert data["passed"] and data["first_divergence"] is None
    md = (tmp_path / "b" / "report.md").read_text()
    assert "waived: swapped-geglu@float32 geglu-swapped" in md
    assert data["status"] == "WAIVED" and md.startswith("## parity: 🟡 WAIVED")
    assert [v["status"] for v in data["verdicts"]] == ["WAIVED"]  # the run table says it too, not FAIL
    assert "| WAIVED |" in md and "| FAIL |" not in md
    assert {d["severity"] for d in data["diagnosis"]} == {"waived"}
    assert any(t["waived"].startswith("known, fix pending") for t in data["taps"] if not t["passed"])
    expired = waivers.read_text().replace("2999-01-01", "2000-01-01")
    waivers.write_text(expired)
    assert main(args + ["--out", str(tmp_path / "c"), "--waivers", str(waivers)]) == 1  # expired: fails again
