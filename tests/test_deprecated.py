"""The old top-level import paths: the two the README once taught warn, name their new home and the version that
removes them, and hand out (and patch) the new module's very objects; the rest are gone. The checks are shown
failing on an old-style shim that copied the names."""

import importlib
import sys
import warnings
from pathlib import Path

import pytest
from packaging.version import Version

import parity
from parity._deprecated import MOVED, REMOVE_IN

# one public name of each moved module, read through the old path
NAME = {"parity.weights": "map_weights", "parity.taps": "expand_tap_map"}
GONE = ("parity.spec", "parity.trace", "parity.checks", "parity.presets", "parity.litgpt_style")


def read_through(old: str, name: str):
    """(the object `old.name` gives, the DeprecationWarnings reading it raised)."""
    module = importlib.import_module(old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(module, name)
    return value, [w for w in caught if issubclass(w.category, DeprecationWarning)]


def check_moved(old: str, new: str, name: str) -> None:
    value, said = read_through(old, name)
    assert [str(w.message) for w in said] == [f"{old} moved to {new} and goes in {REMOVE_IN}; import {name} from {new}"]
    assert said[0].filename == __file__  # points at the caller's line, not at parity's
    assert value is getattr(importlib.import_module(new), name)


def test_every_old_path_is_covered():
    assert set(NAME) == set(MOVED)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_gives_the_moved_object(old):
    check_moved(old, MOVED[old], NAME[old])


@pytest.mark.parametrize("old", sorted(MOVED))
def test_from_import_through_an_old_path_warns(old):
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        exec(f"from {old} import {NAME[old]}", {})


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_monkeypatch_through_an_old_path_patches_the_moved_module(old, monkeypatch):
    new, sentinel = importlib.import_module(MOVED[old]), object()
    real = getattr(new, NAME[old])
    with pytest.warns(DeprecationWarning):
        monkeypatch.setattr(f"{old}.{NAME[old]}", sentinel)
    assert getattr(new, NAME[old]) is sentinel  # what parity itself calls
    with pytest.warns(DeprecationWarning):
        monkeypatch.undo()
    assert getattr(new, NAME[old]) is real


@pytest.mark.parametrize("old", sorted(MOVED))
def test_deprecated_path_is_removed_on_time(old):
    assert Version(parity.__version__) < Version(REMOVE_IN), f"remove {old} (and its line in MOVED)"


@pytest.mark.parametrize("old", GONE)
def test_paths_nothing_imported_are_gone(old):
    # the file, not an import: an editable install of another checkout would still find its own copy
    assert not (Path(parity.__file__).parent / f"{old.removeprefix('parity.')}.py").exists()


def test_the_checks_fail_on_an_old_style_shim(tmp_path, monkeypatch):
    """The shim kind this replaced: a star import that copies the names, silent, patched on its own copy."""
    (tmp_path / "old_taps.py").write_text("from parity.model.taps import *  # noqa: F401,F403\n"
                                          "from parity.model.taps import expand_tap_map  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "old_taps", raising=False)
    with pytest.raises(AssertionError):
        check_moved("old_taps", "parity.model.taps", "expand_tap_map")  # no warning
    new = importlib.import_module("parity.model.taps")
    real = new.expand_tap_map
    monkeypatch.setattr("old_taps.expand_tap_map", object())
    assert new.expand_tap_map is real  # the patch went nowhere parity looks
