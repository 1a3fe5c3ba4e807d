"""A built-in implementation is its adapter module and one registry line (parity.adapters.registry.BUILTINS).

A toy built-in (a whole third-party-style Gemma, tests/third_party_gemma.py, under another name) registered
with one `Builtin` line is selectable by --impls, listed in --help and in the default list when it is installed,
skipped or refused with its declared one-line message when it is not, and its declared frameworks are what the
layering test checks. Entry points and module:factory keep resolving beside the table.
"""

import functools
import json
import tomllib
from pathlib import Path

import pytest

from parity.adapters import registry
from parity.adapters.registry import BUILTINS, Builtin, default_impls, get_adapter, listing
from parity.capture.implementations import Selection, resolve_impls
from parity.errors import BackendMissing, ImplementationError, ParityInputError
from parity.report.cli import main, parser
from tests.test_layering import import_graph, outside_adapters, undeclared

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ["--tokens", "2,17,301,5,88"]


@functools.cache
def toy_class():
    """Made when first asked for: it subclasses a torch model, and collecting the suite imports no framework."""
    from tests.third_party_gemma import ThirdPartyGemma

    class Toy(ThirdPartyGemma):
        """A real implementation other than the port (its own modules, hooks and a function GELU), renamed."""

        name = "toy"

    return Toy


def __getattr__(name: str):  # "tests.test_impl_registry:Toy" resolves here (a module's __getattr__, PEP 562)
    if name == "Toy":
        return toy_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TOY = Builtin("toy", "tests.test_impl_registry:Toy", ("torch",), "pip install toy-gemma", default=True)
ABSENT = "parity_registry_test_absent_pkg"  # a package no machine has


@pytest.fixture
def only(monkeypatch):
    """The registry replaced by the given lines (the port kept as the reference): what one line changes."""

    def use(*entries: Builtin) -> None:
        monkeypatch.setattr(registry, "BUILTINS", {b.name: b for b in (BUILTINS["litgpt-style"], *entries)})

    return use


def _cli(tmp_path, capsys, *args) -> tuple[int, str]:
    code = main(["--impls", "toy", "--dtypes", "float32", "--quiet", "--out", str(tmp_path / "out"), *TOKENS, *args])
    return code, capsys.readouterr().err.strip()


def test_one_line_makes_a_builtin_selectable_by_impls(only, tmp_path, capsys):
    only()
    code, err = _cli(tmp_path, capsys)
    assert code == 2 and "unknown implementation 'toy'" in err  # not registered: not a name
    only(TOY)
    code, err = _cli(tmp_path, capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(r["impl"], r["dtype"], r["mode"]) for r in data["runs"]] == [("toy", "float32", "cumulative")]
    assert isinstance(get_adapter("toy"), toy_class())


def test_an_installed_builtin_is_listed_in_help_and_run_by_default(only, tiny):
    only(TOY)
    assert default_impls() == ["litgpt-style", "toy"]
    assert "toy" in listing() and "toy (not installed)" not in listing()
    assert "toy" in " ".join(parser().format_help().split())
    sel = Selection(spec=tiny, impls=None, dtypes=["float32"], reference=("litgpt-style", "float64"))
    impls, skipped = resolve_impls(sel)
    assert [n for n, _ in impls] == ["litgpt-style", "toy"] and skipped == {}
    only(Builtin("toy", TOY.factory, ("torch",), TOY.missing))  # the same line, not default
    assert default_impls() == ["litgpt-style"] and "toy" in listing()


def test_a_missing_builtin_is_skipped_by_default_and_refused_by_name_with_its_message(only, tiny, tmp_path,
                                                                                    capsys):
    only(Builtin("toy", TOY.factory, ("torch",), "pip install toy-gemma", needs=("torch", ABSENT), default=True))
    assert "toy (not installed)" in listing()
    sel = Selection(spec=tiny, impls=None, dtypes=["float32"], reference=("litgpt-style", "float64"))
    impls, skipped = resolve_impls(sel)
    assert [n for n, _ in impls] == ["litgpt-style"]
    assert skipped == {"toy": f"implementation 'toy' needs {ABSENT}, which is not installed here; "
                              "pip install toy-gemma"}
    code, err = _cli(tmp_path, capsys)
    assert code == 2 and err == f"parity: error: {skipped['toy']}"  # one line: the declared fix
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_missing_module_gives_the_declared_message_and_a_broken_one_its_own_error(only, tmp_path, monkeypatch):
    only(Builtin("gone", "parity.adapters.no_such_adapter:Gone", ("torch",), "pip install gone-gemma"))
    with pytest.raises(BackendMissing, match="needs parity.adapters.no_such_adapter, which is not installed "
                                             "here; pip install gone-gemma$"):
        get_adapter("gone")
    # a module importing its framework at the top, the framework absent: the line's message
    (tmp_path / "toy_top_import.py").write_text(f"import {ABSENT}\nToy = None\n")
    (tmp_path / "toy_typo.py").write_text("import parity_registry_test_typo\nToy = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    only(Builtin("top", "toy_top_import:Toy", (ABSENT,), "pip install top-gemma", needs=()),
         Builtin("typo", "toy_typo:Toy", ("torch",), "pip install typo-gemma"))
    with pytest.raises(BackendMissing, match=f"needs {ABSENT}, which is not installed here; pip install top-gemma"):
        get_adapter("top")
    with pytest.raises(ModuleNotFoundError, match="parity_registry_test_typo"):  # a bug, not a missing backend
        get_adapter("typo")


def test_the_layering_test_reads_the_frameworks_from_the_registry(only, tmp_path):
    pkg = tmp_path / "parity"
    for d in ("adapters", "compare"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "adapters" / "toy.py").write_text("def build():\n    import toyfw\n")  # allowed here
    (pkg / "compare" / "x.py").write_text("import toyfw.ops\n")
    only(TOY)
    assert outside_adapters(import_graph(tmp_path)[1]) == {}  # toyfw: nobody's framework
    only(Builtin("toy", "parity.adapters.toy:Toy", ("toyfw",), "pip install toyfw"))
    assert outside_adapters(import_graph(tmp_path)[1]) == {"parity.compare.x": {"toyfw"}}


def test_the_layering_test_checks_the_toy_declares_what_its_adapter_imports(only):
    only(TOY)
    assert undeclared(TOY) == {}
    bare = Builtin("toy", TOY.factory, (), TOY.missing)  # torch used, not declared
    assert undeclared(bare) == {"tests.third_party_gemma": {"torch"}, "parity.adapters.torch_hooks": {"torch"}}


def undeclared_extras(entries, pyproject: Path) -> list[str]:
    extras = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
    return [b.name for b in entries if b.extra is not None and b.extra not in extras]


def test_each_extra_a_builtin_names_is_one_pyproject_declares():
    assert undeclared_extras(BUILTINS.values(), ROOT / "pyproject.toml") == []
    assert undeclared_extras([Builtin("toy", TOY.factory, (), "x", extra="toy")], ROOT / "pyproject.toml") == ["toy"]
    for b in BUILTINS.values():
        assert "\n" not in b.missing and (b.extra is None or f"[{b.extra}]" in b.missing), b


def test_entry_points_and_module_factory_resolve_beside_the_table(tmp_path, monkeypatch):
    dist = tmp_path / "toy_gemma-0.1.dist-info"  # an installed distribution registering a plug-in
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-gemma\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[parity.adapters]\ntoy-plugin = tests.test_impl_registry:Toy\n"
                                           "bare-plugin = tests.test_impl_registry:NotAnAdapter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "toy-plugin" in registry.known_names() and "toy-plugin" not in BUILTINS
    assert isinstance(get_adapter("toy-plugin"), toy_class())
    assert isinstance(get_adapter("tests.test_impl_registry:Toy"), toy_class())
    for name in ("bare-plugin", "tests.test_impl_registry:NotAnAdapter"):
        with pytest.raises(ImplementationError, match="has no 'version'"):
            get_adapter(name)
    with pytest.raises(ParityInputError, match="unknown implementation 'nope'; use one of .*toy-plugin"):
        get_adapter("nope")


class NotAnAdapter:
    name = "not-an-adapter"

