"""The version gate (parity/adapters/versions.py): each built-in's declared library ranges, read from installed
metadata, refuse an out-of-range install in one line (exit 2) before any work.

The ranges under test are the registry's own; an out-of-range install is made by declaring a range the real
installed torch / transformers cannot meet (the metadata read is the real one), since one venv holds one version.
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import version

import pytest

from parity.adapters.registry import BUILTINS
from parity.adapters.registry import require, require_spec
from parity.adapters.versions import parse, satisfies, split, unmet
from parity.errors import BackendMissing, ParityInputError, Unsupported


@pytest.mark.parametrize("have,spec,ok", [
    ("5.3.0", ">=5.3", True), ("5.2.9", ">=5.3", False), ("5.25.0", ">=5.3", True),  # 25 > 3, not a string order
    ("2.13.0+cpu", ">=2.4,<2.14", True), ("2.14.0", ">=2.4,<2.14", False), ("4.50.3", ">=4.50", True),
    ("4.49.0", ">=4.50", False), ("5.0.0rc1", ">=5.0", True), ("5.0", "==5.0.0", True), ("unknown", ">=9", True),
])
def test_satisfies(have, spec, ok):
    assert satisfies(have, spec) is ok


def test_a_malformed_requirement_is_refused_not_passed():
    with pytest.raises(ValueError, match="operator"):
        satisfies("1.0", "~1.0")
    assert split("keras-hub>=0.18") == ("keras-hub", ">=0.18")
    assert parse("v0.10.2") == (0, 10, 2) and parse("dev") is None


def test_every_declared_range_parses_and_holds_here():
    """The registry's ranges are well-formed, and this (supported) install meets every "run" range."""
    for b in BUILTINS.values():
        for feature, reqs in b.versions.items():
            for r in reqs:
                dist, spec = split(r)
                satisfies("1.0", spec)  # raises on a malformed clause
        assert unmet(b.versions.get("run", ())) == [], b.name


def _declare(monkeypatch, name: str, **versions):
    monkeypatch.setitem(BUILTINS, name, dataclasses.replace(BUILTINS[name], versions=versions))


def test_an_out_of_range_library_is_one_line_naming_it_its_version_and_the_fix(monkeypatch):
    _declare(monkeypatch, "litgpt-style", run=("torch>=99",))
    with pytest.raises(BackendMissing) as e:
        require("litgpt-style")
    msg = e.value.render()
    assert "\n" not in msg and "torch>=99" in msg and version("torch") in msg and "pip install 'torch>=99'" in msg
    assert e.value.exit_code == 2
    from parity.adapters import get_adapter

    with pytest.raises(BackendMissing, match="torch>=99"):  # selecting the built-in checks it, before any import
        get_adapter("litgpt-style")
    _declare(monkeypatch, "litgpt-style", run=("torch>=2.4",))
    require("litgpt-style")  # in range: passes


def test_the_family_gate_refuses_a_spec_this_library_cannot_build(monkeypatch):
    pytest.importorskip("transformers")
    _declare(monkeypatch, "hf", gemma3=("transformers>=99",))
    with pytest.raises(Unsupported, match=r"Gemma 3 specs; transformers .* is installed"):
        require_spec("hf", 3)
    require_spec("hf", 2)  # no range declared for Gemma 2 here: passes
    from parity.capture.implementations import check_adapter
    from parity.adapters.hf import HFAdapter
    from parity.model.presets import resolve_spec

    with pytest.raises(Unsupported, match="transformers>=99"):  # the one path to every build
        check_adapter(HFAdapter(), resolve_spec("tiny-gemma3"), "float32")


def test_decode_is_refused_up_front_by_the_request_check(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    from parity.harness import Request, check_request
    from parity.model.presets import resolve_spec

    _declare(monkeypatch, "hf", decode=("transformers>=99",))
    req = Request(spec=resolve_spec("tiny-gemma"), impls=["hf"], dtypes=["float32"], decode=4)
    with pytest.raises(ParityInputError, match="needs transformers>=99 for --decode"):
        check_request(req)
    check_request(dataclasses.replace(req, decode=0))  # prefill only: the decode range does not apply


def test_hf_decode_range_is_the_api_the_adapter_drives():
    """On this install the declared decode range and the adapter's own feature test agree."""
    transformers = pytest.importorskip("transformers")
    import inspect

    from transformers.generation.utils import GenerationMixin

    has_api = "next_sequence_length" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    in_range = not unmet(BUILTINS["hf"].versions["decode"])
    assert has_api == in_range, transformers.__version__
