"""The layering, checked: no import circle among parity's modules (function-local imports included), and no
framework imported outside parity/adapters/. The scan is shown failing on a package that breaks each rule."""

import ast
from pathlib import Path

FRAMEWORKS = {"torch", "jax", "jaxlib", "keras", "keras_hub", "keras_nlp", "tensorflow", "transformers", "litgpt",
              "flax"}
ROOT = Path(__file__).resolve().parents[1]


def import_graph(root: Path, package: str = "parity") -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """module -> the package's modules it imports anywhere in its body, and module -> frameworks it imports."""
    mods = {}
    for f in (root / package).rglob("*.py"):
        name = ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    frameworks: dict[str, set[str]] = {}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t.split(".")[0] in FRAMEWORKS:
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
