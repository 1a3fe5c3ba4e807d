"""The names the README teaches are importable from `parity`, lazily: importing parity imports no framework."""

import subprocess
import sys


def test_every_public_name_resolves():
    import parity

    for name in parity.__all__:
        assert getattr(parity, name) is not None, name


def test_importing_parity_imports_no_framework():
    code = ("import sys, parity; from parity import Request, GemmaSpec, PRESETS; "
            "print([m for m in ('torch', 'jax', 'tensorflow', 'keras', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
