"""The layering, checked: no import circle among parity's modules (function-local imports included), no
framework imported outside parity/adapters/, and each built-in's adapter importing only the frameworks its
registry line declares. The frameworks are the registry's (parity.adapters.registry.frameworks()), never a copy
kept here. The scan is shown failing on a package that breaks each rule."""

import ast
import importlib.util
from pathlib import Path

from parity.adapters.registry import BUILTINS, Builtin, frameworks as registry_frameworks

ROOT = Path(__file__).resolve().parents[1]


def imported(tree: ast.AST) -> list[str]:
    """Every absolute module name a parsed file imports, function-local imports included (`from m import a`
    gives m and m.a: a may be a module)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def import_graph(root: Path, package: str = "parity") -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """module -> the package's modules it imports anywhere in its body, and module -> frameworks it imports."""
    mods = {}
    for f in (root / package).rglob("*.py"):
        name = ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    frameworks: dict[str, set[str]] = {}
    known = registry_frameworks()  # read now: the live registry, a test's toy entry included
    for m, f in mods.items():
        for t in imported(ast.parse(f.read_text())):
            if t.split(".")[0] in known:
                frameworks.setdefault(m, set()).add(t.split(".")[0])
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != m and not m.startswith(t + "."):  # a module reaching into its own package is not a cycle
                graph[m].add(t)
    return graph, frameworks


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def outside_adapters(frameworks: dict[str, set[str]], package: str = "parity") -> dict[str, set[str]]:
    return {m: fw for m, fw in frameworks.items() if not m.startswith(f"{package}.adapters")}


def _source(module: str) -> Path | None:
    """The .py file of `module` (its package's __init__.py for a package), or None: not a module here."""
    try:
        spec = importlib.util.find_spec(module)  # imports the parent packages only: parity.adapters is light
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def undeclared(entry: Builtin) -> dict[str, set[str]]:
    """module -> the frameworks it imports that `entry` does not declare, over every module its adapter runs:
    the factory's module, and what it imports from its own package and from parity.adapters (shared helpers
    such as torch_hooks), followed transitively."""
    start = entry.factory.partition(":")[0]
    own = start.rpartition(".")[0] or start
    known = registry_frameworks() | set(entry.frameworks)
    todo, seen, out = [start], set(), {}
    while todo:
        mod = todo.pop()
        path = _source(mod)
        if mod in seen or path is None:
            continue
        seen.add(mod)
        for t in imported(ast.parse(path.read_text())):
            top = t.split(".")[0]
            if top in known and top not in entry.frameworks:
                out.setdefault(mod, set()).add(top)
            if t.startswith(("parity.adapters.", f"{own}.")):
                todo.append(t)
    return out


# the stages in the order data flows through them; a module may import its own stage and earlier ones only
STAGES = ("numerics", "model", "formats", "adapters", "capture", "compare", "diagnose", "gate", "harness", "report",
          "suite")
LEVEL = {"numerics": 0, "model": 1, "formats": 1, "adapters": 2, "capture": 3, "compare": 4, "diagnose": 5,
         "gate": 6, "harness": 7, "report": 8, "suite": 9}
CORE = {"errors", "_deprecated"}  # below every stage
SHIMS = {"weights", "taps"}  # old paths, deprecated (parity._deprecated.MOVED)


def level_of(module: str, package: str = "parity") -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != package:
        return None
    if parts[1] in CORE:
        return -1
    if len(parts) == 2 and (parts[1] in SHIMS or parts[1].startswith("test_")):
        return None  # a shim re-exports a moved module; the shipped suite's tests use every stage
    return LEVEL.get(parts[1])


def upward(graph: dict[str, set[str]], package: str = "parity") -> list[tuple[str, str]]:
    """(module, the later stage's module it imports), function-local imports included."""
    out = []
    for m, deps in sorted(graph.items()):
        a = level_of(m, package)
        for d in sorted(deps):
            b = level_of(d, package)
            if a is not None and b is not None and b > a:
                out.append((m, d))
    return out


def test_no_stage_imports_a_later_stage():
    graph, _ = import_graph(ROOT)
    assert upward(graph) == []
    top = {m.split(".")[1] for m in graph if m.count(".") >= 1}
    unplaced = sorted(t for t in top if t not in LEVEL and t not in CORE and t not in SHIMS
                      and not t.startswith("test_"))
    assert not unplaced, f"modules outside every stage (give each a stage in STAGES): {unplaced}"


def test_the_stage_check_fails_on_an_upward_import(tmp_path):
    pkg = tmp_path / "parity"
    for d in ("model", "report"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "spec.py").write_text("def f():\n    from parity.report.cli import main  # upward\n")
    (pkg / "report" / "cli.py").write_text("from parity.model.spec import f  # downward: fine\n")
    graph, _ = import_graph(tmp_path)
    assert upward(graph) == [("parity.model.spec", "parity.report.cli")]


def test_parity_has_no_import_circle():
    graph, _ = import_graph(ROOT)
    assert cycles(graph) == []


def test_frameworks_are_imported_only_in_adapters():
    _, frameworks = import_graph(ROOT)
    assert outside_adapters(frameworks) == {}


def test_each_builtin_declares_the_frameworks_its_adapter_imports():
    assert {b.name: undeclared(b) for b in BUILTINS.values()} == {b: {} for b in BUILTINS}
    assert {"torch", "transformers", "keras", "jax", "litgpt"} <= registry_frameworks()


def test_the_declaration_check_fails_on_an_adapter_importing_more_than_it_declares():
    hf = BUILTINS["hf"]
    wrong = Builtin(hf.name, hf.factory, ("torch",), hf.missing)  # hf without transformers
    assert undeclared(wrong) == {"parity.adapters.hf": {"transformers"}, "parity.adapters.hf_gemma4": {"transformers"}}


def test_the_scan_fails_on_a_circle_and_on_a_framework_outside_adapters(tmp_path):
    pkg = tmp_path / "parity"
    (pkg / "adapters").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "adapters" / "__init__.py").write_text("import torch\n")  # allowed here
    (pkg / "a.py").write_text("from parity import b\n")
    (pkg / "b.py").write_text("def f():\n    from parity.a import g  # function-local: still an edge\n")
    (pkg / "c.py").write_text("def f():\n    import jax.numpy\n")
    graph, frameworks = import_graph(tmp_path)
    assert cycles(graph) == [["parity.a", "parity.b"]]
    assert outside_adapters(frameworks) == {"parity.c": {"jax"}}
