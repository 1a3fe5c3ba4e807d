"""Exit codes mean one thing each: a crash in an implementation is 3 with one line, never 1 (a divergence)."""

import pytest

from parity.report.cli import main

ARGS = ["--dtypes", "float32", "--tokens", "2,17,301,5", "--quiet"]


@pytest.mark.parametrize("factory,phase", [("fails_in_build", "build()"), ("fails_in_run", "run() (cumulative"),
                                           ("factory_raises", "its factory"), ("no_check", "has no 'check'"),
                                           ("check_raises", "check()")])
def test_an_adapter_that_crashes_exits_3_with_one_line(tmp_path, capsys, factory, phase):
    out = tmp_path / "out"
    code = main(["--impls", f"tests.broken_adapters:{factory}", "--out", str(out), *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3, err
    assert len(err) == 1 and err[0].startswith("parity: implementation failed: "), err
    assert phase in err[0] and "Traceback" not in err[0]
    log = out / "parity-error.log"
    assert log.is_file() and str(log) in err[0]
    assert not (out / "report.json").exists()  # no verdict was written


def test_a_divergence_is_1_and_parity_is_0(tmp_path):
    assert main(["--impls", "tests.variants:swapped_geglu", "--out", str(tmp_path / "a"), *ARGS]) == 1
    assert main(["--impls", "litgpt-style", "--out", str(tmp_path / "b"), *ARGS]) == 0


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for code in ("0  parity", "1  a divergence", "2  bad input", "3  an implementation failed"):
        assert code in text


def test_a_capture_process_killed_like_an_oom_is_exit_3(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--impls", "tests.broken_adapters:killed_in_build", "--separate-processes", "--out", str(out), *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert "tests.broken_adapters:killed_in_build@float32" in err[0]  # the child is named by its --impls value
    assert "killed by signal 9 (out of memory?)" in err[0] and "capture in a separate process" in err[0]


def test_no_tensorflow_or_absl_start_up_lines(tmp_path):
    """keras-hub imports TensorFlow, whose C++ start-up lines come before any log level: none reach the user."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "parity.report", "--impls", "keras", *ARGS, "--out", str(tmp_path)],
                          capture_output=True, text=True, env={k: v for k, v in __import__("os").environ.items()
                                                               if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("cudart", "absl::InitializeLog", "oneDNN", "I0000"):
        assert noise not in proc.stderr + proc.stdout, noise
