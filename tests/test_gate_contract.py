"""The exit-status contract where a verdict could lie (issue 18): hostile plug-ins, contradicting options,
duplicated values, corrupt traces, a hung implementation, names that would leave --out, a locked --out,
an interrupt. Each case: the exit status, one line on stderr, no traceback, and what --out holds."""

import os
import signal
import time

import numpy as np
import pytest

from parity.report.cli import main

ARGS = ["--dtypes", "float32", "--tokens", "2,17,301,5", "--quiet"]


def run_cli(argv, capsys):
    start = time.perf_counter()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, time.perf_counter() - start


def leftovers(folder):
    """Everything a run left beside or in `folder`: staging folders, locks, part files."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".") and p.name != ".hypothesis") + \
        (sorted(p.name for p in folder.rglob(".*")) if folder.exists() else [])


@pytest.mark.parametrize("factory,needle", [
    ("exits_in_factory", "sys.exit(0)"),
    ("exits_in_build", "sys.exit(0)"),
    ("gives_nothing", "no tap was compared"),
])
def test_a_plug_in_that_exits_or_gives_nothing_is_exit_3_never_a_pass(tmp_path, capsys, factory, needle):
    out = tmp_path / "out"
    code, err, _ = run_cli(["--impls", f"tests.broken_adapters:{factory}", "--out", str(out), *ARGS], capsys)
    assert code == 3 and len(err) == 1 and needle in err[0], err
    assert not (out / "report.json").exists() and (out / "parity-error.log").is_file()
    assert leftovers(out) == []


def test_a_hung_implementation_is_stopped_naming_the_phase(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PARITY_TIMEOUT", "2")
    code, err, took = run_cli(["--impls", "tests.broken_adapters:sleeps_in_run", "--out", str(tmp_path / "o"),
                               *ARGS], capsys)
    assert code == 3 and len(err) == 1 and "timed out" in err[0] and "run()" in err[0], err
    assert took < 60


@pytest.mark.parametrize("extra", [["--decode", "4"], ["--impls", "keras"], ["--spec", "tiny-gemma2"],
                                   ["--dtypes", "float32"], ["--mode", "both"], ["--seed", "3"]])
def test_options_a_trace_comparison_would_ignore_are_refused(tmp_path, capsys, extra):
    out = tmp_path / "o"
    code, err, took = run_cli(["--trace", "x.safetensors", *extra, "--out", str(out), "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and extra[0] in err[0] and "--trace" in err[0], err
    assert not out.exists() and took < 5


@pytest.mark.parametrize("opt,value", [("--dtypes", "float32,float32"), ("--impls", "hf,litgpt-style,hf")])
def test_a_value_listed_twice_is_refused(tmp_path, capsys, opt, value):
    out = tmp_path / "o"
    code, err, _ = run_cli([opt, value, "--tokens", "2,17", "--quiet", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and opt in err[0] and "more than once" in err[0], err
    assert not out.exists()


def test_a_bit_flipped_trace_is_bad_input_naming_the_file(tmp_path, capsys, tiny, tiny_weights, tokens):
    from parity.adapters.litgpt_style import LitgptStyleAdapter
    from parity.capture.runner import capture
    from parity.capture.trace import load_trace
    from parity.errors import ParityInputError

    ref, other = (capture(LitgptStyleAdapter(), tiny, tiny_weights, d, {"p": tokens})[0] for d in ("float64", "float32"))
    a, b = ref.save(tmp_path / "ref.safetensors"), other.save(tmp_path / "b.safetensors")
    load_trace(b)  # intact: reads
    raw = bytearray(b.read_bytes())
    raw[-3] ^= 0x10  # one bit of the last tap's data
    b.write_bytes(bytes(raw))
    with pytest.raises(ParityInputError, match="checksum"):
        load_trace(b)
    out = tmp_path / "o"
    code, err, _ = run_cli(["--trace", str(a), "--trace", str(b), "--quiet", "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and str(b) in err[0] and "checksum" in err[0], err
    assert not out.exists()


def test_weights_whose_metadata_claims_parity_made_them_are_still_checked(tmp_path, tiny, tiny_weights):
    from parity.errors import ParityInputError
    from parity.model.tensor_file import write_safetensors
    from parity.model.weights import load_weights

    tensors = {k: np.array(v, dtype=np.float32) for k, v in tiny_weights.tensors.items()}
    first = sorted(tensors)[0]
    tensors[first].flat[0] = np.nan
    path = tmp_path / "w.safetensors"
    write_safetensors(path, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()],
                      {"generator": "parity"})
    with pytest.raises(ParityInputError, match="NaN"):
        load_weights(str(path), tiny).check()


def test_an_implementation_name_cannot_write_outside_out(tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    code, err, _ = run_cli(["--impls", "tests.broken_adapters:evil_name", "--save-traces", "--out", str(out),
                            *ARGS], capsys)
    assert code == 0, err
    written = {p.resolve() for p in tmp_path.rglob("*.safetensors")}
    assert written and all(str(p).startswith(str((out / "traces").resolve())) for p in written), written
    assert not (tmp_path / "evil").exists()


def test_an_empty_out_is_refused(capsys):
    code, err, _ = run_cli(["--out", "", *ARGS], capsys)
    assert code == 2 and len(err) == 1 and "--out is empty" in err[0], err


def test_a_second_run_on_a_locked_out_is_refused(tmp_path, capsys):
    from parity.report.files import OutDir

    out = tmp_path / "o"
    held = OutDir(str(out)).open()
    try:
        code, err, _ = run_cli(["--impls", "litgpt-style", "--out", str(out), *ARGS], capsys)
        assert code == 2 and len(err) == 1 and "another parity run" in err[0], err
    finally:
        held.discard()
    assert leftovers(out) == []
    code, err, _ = run_cli(["--impls", "litgpt-style", "--out", str(out), *ARGS], capsys)
    assert code == 0 and (out / "report.json").is_file()


def test_a_run_publishes_whole_and_replaces_a_stale_error_log(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "parity-error.log").write_text("old failure")
    (out / "mine.txt").write_text("the user's own file")
    code, _, _ = run_cli(["--impls", "litgpt-style", "--save-traces", "--out", str(out), *ARGS], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "report.html", "report.json", "report.md", "traces"]
    assert leftovers(out) == []
    code, _, _ = run_cli(["--impls", "tests.broken_adapters:fails_in_build", "--out", str(out), *ARGS], capsys)
    assert code == 3  # a failure leaves no stale report contradicting it
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "parity-error.log"]


def test_an_interrupt_is_one_line_exit_130_and_nothing_written(tmp_path):
    """Ctrl-C as a user gives it: SIGINT to a parity process while an implementation hangs in run(). Its own
    process, not this test's, and with SIGINT at its default there (a run of the suite started in the background
    of a script has SIGINT ignored throughout: a SIGINT sent to the pytest worker never reached the hang)."""
    import subprocess
    import sys
    from pathlib import Path

    out, started = tmp_path / "o", tmp_path / "run-started"
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PARITY_TIMEOUT="0", PARITY_TEST_RUN_STARTED=str(started),
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    # SIGINT at its default in the child, as a terminal's foreground process has it: a job started in the
    # background of a non-interactive shell (a CI script's `cmd &`) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler (rightly: parity honours an ignored SIGINT as every program does)
    child = subprocess.Popen([sys.executable, "-m", "parity.report", "--impls", "tests.broken_adapters:sleeps_in_run",
                              "--out", str(out), *ARGS], cwd=root, env=env, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not started.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started.exists(), "the hanging adapter never reached run()"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    lines = err.strip().splitlines()
    assert child.returncode == 130 and lines == ["parity: interrupted; nothing written"], (child.returncode, lines)
    assert not out.exists() and leftovers(out) == []
