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
