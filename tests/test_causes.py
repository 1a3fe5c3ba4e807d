"""The cause catalogue: parity/diagnose/causes.py is the one table, docs/causes.md is generated from it, and every
cause id the code names is in it."""

import ast
import re
from pathlib import Path

import pytest

from parity.diagnose import causes
from parity.diagnose.causes import CAUSE_IDS, CAUSES, KINDS, NOTE_CAUSES, check_cause, describe, markdown_drift, to_markdown
from parity.errors import ParityInputError

ROOT = Path(__file__).resolve().parents[1]
ID = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")  # lowercase words joined by dashes
# the files that name causes: the diagnosis and what it relies on, and the injected faults
PROBE_FILES = tuple(f"parity/diagnose/probes/{m}.py" for m in ("_evidence", "mlp", "norms", "attention", "head"))
NAMING_FILES = PROBE_FILES + ("parity/diagnose/counterfactuals.py", "parity/diagnose/run.py", "tests/faults.py")
# ids published before the catalogue moved into the project: reports, baselines and waiver files hold them
PUBLISHED = {
    "gelu-exact", "geglu-swapped", "geglu-width", "norm-unit-offset-missing", "norm-unit-offset-lowp",
    "norm-cast-order", "norm-placement", "embed-scale-missing", "embed-scale-dtype", "rope-layout",
    "rope-precision", "rope-base", "query-scale", "attn-softcap-missing", "final-softcap-missing",
    "sliding-window", "qk-norm-missing", "act-lowp", "softmax-precision", "final-norm-missing",
    "lm-head-untied", "unexplained",
}


def test_the_table_is_well_formed():
    ids = [c.id for c in CAUSES]
    assert len(ids) == len(set(ids)) == len(CAUSE_IDS)
    assert all(ID.fullmatch(i) for i in ids), [i for i in ids if not ID.fullmatch(i)]
    assert all(c.kind in KINDS and c.title and c.what for c in CAUSES)
    assert PUBLISHED <= CAUSE_IDS, f"published ids are never renamed: {sorted(PUBLISHED - CAUSE_IDS)}"
    assert {"weights-swapped", "weights-transposed", "qkv-order", "softcap-misplaced", "logit-shift",
            "honest-rounding"} <= CAUSE_IDS
    assert NOTE_CAUSES == {"act-lowp", "softmax-precision", "logit-shift", "router-precision", "gelu-fp16-table"}
    assert {c.id for c in CAUSES if c.kind == "verdict"} == {"unexplained", "honest-rounding"}


def test_describe_and_check_cause():
    assert describe("gelu-exact").startswith("gelu-exact (exact GELU): ")
    assert check_cause("logit-shift", "here") == "logit-shift"
    with pytest.raises(ParityInputError) as e:
        check_cause("gelu-exakt", "w.toml waiver #1")
    msg = str(e.value)
    assert "'gelu-exakt'" in msg and msg.startswith("w.toml waiver #1") and "\n" not in msg
    assert all(i in msg for i in CAUSE_IDS)  # it lists the valid ids
    with pytest.raises(ParityInputError, match="'nope'"):
        describe("nope")


def test_waivers_use_the_one_table():
    from parity.gate import waivers

    assert waivers.CAUSE_IDS is CAUSE_IDS


# ------------------------------------------------------------------ docs/causes.md cannot drift
def test_docs_causes_md_is_generated_from_the_table():
    text = (ROOT / causes.DOC_PATH).read_text()
    assert markdown_drift(text) is None, markdown_drift(text)
    assert text == to_markdown()


def test_the_drift_check_reports_a_hand_edit():
    text = to_markdown()
    edited = text.replace("`gelu-exact`", "`gelu-exactly`", 1)
    msg = markdown_drift(edited)
    line = next(n for n, s in enumerate(text.splitlines(), 1) if "`gelu-exact`" in s)
    assert msg and f"at line {line}" in msg and "gelu-exactly" in msg and causes.REGENERATE in msg
    assert "lines" in markdown_drift(text + "- one more lesson\n")
    assert "whitespace" in markdown_drift(text.replace("\n", "\r\n"))


def test_the_generated_file_names_every_cause_and_says_how_to_regenerate():
    text = to_markdown()
    assert causes.REGENERATE in text.split("\n## ")[0]
    assert all(f"| `{c.id}` |" in text for c in CAUSES)
    assert causes.CALIBRATION in text and all(f"- {lesson}" in text for lesson in causes.LESSONS)


# ------------------------------------------------------------------ the ids the code names
def _strings(node: ast.AST | None) -> list[str]:
    """String constants an expression can evaluate to as a cause: `"x"`, `a if c else "x"`, `{...: "x"}`,
    `{...}.get(k, "x")`, `{"x", "y"}`."""
    if node is None:
        return []
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) else []
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [s for v in node.values for s in _strings(v)]
    if isinstance(node, ast.Dict):
        return [s for v in node.values for s in _strings(v)]
    if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
        return [s for v in node.elts for s in _strings(v)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return _strings(node.func.value) + [s for a in node.args[1:] for s in _strings(a)]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("set", "frozenset"):
        return [s for a in node.args for s in _strings(a)]
    return []


def _is_cause_ref(node: ast.AST) -> bool:
    """`x.cause` or `x["cause"]`."""
    return (isinstance(node, ast.Attribute) and node.attr == "cause") or (
        isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "cause")


def _is_cause_name(name: str) -> bool:
    """A variable that holds a cause or a set of them: `cause`, `NORM_CAUSES`, `PRECISION_ONLY`, `NOTE_CAUSES`."""
    return "cause" in name.lower() or name == "PRECISION_ONLY"


def _cause_positions(trees: list[ast.Module]) -> dict[str, int]:
    """Class name -> position of its `cause` field, for the dataclasses (Probe, Counterfactual, Fault)."""
    out = {}
    for tree in trees:
        for cls in ast.walk(tree):
            if isinstance(cls, ast.ClassDef):
                fields = [s.target.id for s in cls.body
                          if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
                if "cause" in fields:
                    out[cls.name] = fields.index("cause")
    return out


def named_causes(paths, root: Path = ROOT) -> dict[str, set[str]]:
    """path -> the cause ids its code names, read with ast (see `_strings` for the expressions understood):
    a `cause=` keyword; the positional `cause` of a dataclass with a `cause` field (`Probe(name, tap,
    verdict, cause, ...)`, `Counterfactual(cause, ...)`, `Fault(name, cause, ...)`); a value keyed "cause" in
    a dict literal; an assignment to `cause` or to a name like `NORM_CAUSES`; a comparison with `x.cause` or
    `x["cause"]`."""
    trees = {p: ast.parse((root / p).read_text(), filename=p) for p in paths}
    positions = _cause_positions(list(trees.values()))
    found: dict[str, set[str]] = {}
    for p, tree in trees.items():
        got = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                got += [s for k in node.keywords if k.arg == "cause" for s in _strings(k.value)]
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name in positions and len(node.args) > positions[name]:
                    got += _strings(node.args[positions[name]])
            elif isinstance(node, ast.Dict):
                got += [s for k, v in zip(node.keys, node.values)
                        if isinstance(k, ast.Constant) and k.value == "cause" for s in _strings(v)]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and _is_cause_name(t.id) for t in targets):
                    got += _strings(node.value)
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_is_cause_ref(s) for s in sides):
                    got += [s for side in sides if not _is_cause_ref(side) for s in _strings(side)]
        found[p] = {s for s in got if ID.fullmatch(s)}
    return found


def test_every_cause_the_code_names_is_in_the_catalogue():
    found = named_causes(NAMING_FILES)
    for p, ids in found.items():
        assert ids, f"{p}: no cause id found; has the way it names causes changed? update named_causes"
        assert ids <= CAUSE_IDS, f"{p} names cause ids not in parity/diagnose/causes.py: {sorted(ids - CAUSE_IDS)}"
    # the reader sees what is really there: the probes' and the faults' ids, positional ones included
    assert {"gelu-exact", "geglu-swapped", "norm-cast-order", "final-norm-missing", "unexplained"} <= \
        set().union(*(found[p] for p in PROBE_FILES))
    assert {"rope-layout", "query-scale", "qk-norm-missing"} <= found["parity/diagnose/counterfactuals.py"]
    assert {"norm-unit-offset-lowp", "attn-softcap-missing", "act-lowp"} <= found["tests/faults.py"]


def test_the_reader_catches_an_unknown_id(tmp_path):
    src = ('from dataclasses import dataclass\n'
           '@dataclass\nclass Probe:\n    name: str\n    tap: str\n    verdict: str\n    cause: str | None\n'
           'def f(x):\n'
           '    cause = {"a b": None, "c": "gelu-exakt"}.get(x, "norm-lowp")\n'
           '    Probe("n", "t", "v", None if x else "geglu-swaped")\n'
           '    g(cause="rope-lay-out")\n'
           '    return {"cause": "unexplaned", "tap": "not-a-cause"}\n')
    (tmp_path / "m.py").write_text(src)
    assert named_causes(["m.py"], tmp_path)["m.py"] == {"gelu-exakt", "norm-lowp", "geglu-swaped", "rope-lay-out",
                                               "unexplaned"}
