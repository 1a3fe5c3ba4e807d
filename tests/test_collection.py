"""Collecting the suite is cheap: no framework is imported and nothing is built until a test runs.

`pytest --collect-only` (and every `-k` run, which collects everything first) used to import keras with
TensorFlow, jax, transformers and torch: 14-30 s before the first test. Each check runs a real collection in a
fresh process, and is shown to fail on a test module that imports a framework at module level.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "keras", "keras_hub", "tensorflow", "transformers", "litgpt")

COLLECT = """
import json, sys
import pytest
rc = pytest.main(["--collect-only", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *sys.argv[2:]])
print(json.dumps({"rc": int(rc), "imported": [m for m in %r if m in sys.modules]}), file=open(sys.argv[1], "w"))
""" % (FRAMEWORKS,)


def collect(tmp_path, *args, cwd=ROOT) -> dict:
    out = tmp_path / "collected.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", COLLECT, str(out), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {**json.loads(out.read_text()), "stdout": proc.stdout}


def test_collecting_the_suite_imports_no_framework(tmp_path):
    got = collect(tmp_path)  # the rootdir's testpaths: tests/ and parity/
    assert got["rc"] == 0, got["stdout"][-3000:]
    assert "keras-bfloat16" in got["stdout"] and "hf-float32" in got["stdout"]  # the defaults, by name
    assert got["imported"] == [], f"collecting imported {got['imported']}: import it in the test that uses it"


def test_the_collection_check_sees_a_module_level_framework_import(tmp_path):
    (tmp_path / "test_heavy.py").write_text("import torch\n\n\ndef test_x():\n    assert torch.ones(1)\n")
    got = collect(tmp_path, str(tmp_path / "test_heavy.py"), "--rootdir", str(tmp_path), cwd=tmp_path)
    assert got["rc"] == 0 and "torch" in got["imported"], got


def test_a_default_implementation_its_check_refuses_is_skipped_with_the_reason(pytester):
    """keras cannot run float64: collected by name (its check imports keras), skipped when set up, saying why;
    the port is the float64 reference, so it has no test of its own; hf runs."""
    pytester.makepyfile(test_x="def test_x(impl_dtype):\n    pass\n")
    r = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "--parity-dtypes", "float64",
                                      "-rs")
    r.assert_outcomes(passed=1, skipped=1)
    out = "\n".join(r.outlines)
    assert "test_x[hf-float64] PASSED" in out or "1 passed" in out
    assert "keras@float64 cannot run here, so it is not compared: keras: cannot run float64" in out, out


def test_a_default_whose_packages_are_not_installed_is_left_out_at_collection(tmp_path):
    """As its check would leave it out, found by name (the registry's `needs`), nothing imported to find out."""
    (tmp_path / "conftest.py").write_text(
        "from parity.adapters import registry\n"
        "registry.BUILTINS['absent-toy'] = registry.Builtin('absent-toy', 'parity_absent_pkg:Toy', "
        "('parity_absent_pkg',), 'pip install absent-toy', default=True)\n")
    (tmp_path / "test_x.py").write_text("def test_x(impl_dtype):\n    pass\n")
    got = collect(tmp_path, "--rootdir", str(tmp_path), cwd=tmp_path)
    assert got["rc"] == 0 and "test_x[hf-float32]" in got["stdout"], got["stdout"][-3000:]
    assert "absent-toy" not in got["stdout"], got["stdout"][-3000:]
