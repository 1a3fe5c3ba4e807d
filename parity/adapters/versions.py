"""Library versions each built-in supports, checked when it is selected: one line and exit 2, not a crash later.

The ranges are declared on each built-in's registry line (`Builtin.versions`, parity/adapters/registry.py,
whose `require` and `require_spec` look them up and call `check`),
per feature: "run" (prefill and isolated: everything the built-in does), "decode", and "gemma1" / "gemma2" /
"gemma3" (the spec's family). docs/versions.md has the same table with where each bound comes from.

Versions are read from the installed distributions' metadata (importlib.metadata): no framework is imported,
so a refusal costs milliseconds. A library that is not installed is not this module's business (the registry's
`absent()` says that); an unparseable version (a source build) is let through rather than refused.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version as dist_version

from parity.errors import BackendMissing

_OPS = (">=", "<=", "==", "!=", "<", ">")  # two-character operators first: ">=" must not read as ">"


def parse(text: str) -> tuple[int, ...] | None:
    """A version's release numbers ('2.13.0+cpu' -> (2, 13, 0); '5.0.0rc1' -> (5, 0, 0)); None if it has none."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))  # 5.0 == 5.0.0
    return (a > b) - (a < b)


def satisfies(installed: str, spec: str) -> bool:
    """Whether `installed` meets every clause of `spec` (">=4.50,<6"); True for a version with no numbers."""
    have = parse(installed)
    if have is None:
        return True
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = next((o for o in _OPS if clause.startswith(o)), None)
        want = parse(clause[len(op):]) if op else None
        if op is None or want is None:
            raise ValueError(f"version clause {clause!r} in {spec!r}: use an operator ({', '.join(_OPS)}) "
                             "and a version, e.g. '>=4.50'")
        c = _cmp(have, want)
        ok = {">=": c >= 0, "<=": c <= 0, "==": c == 0, "!=": c != 0, "<": c < 0, ">": c > 0}[op]
        if not ok:
            return False
    return True


def split(requirement: str) -> tuple[str, str]:
    """'transformers>=5.0' -> ('transformers', '>=5.0')."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", requirement)
    if not m:
        raise ValueError(f"requirement {requirement!r}: write it as name>=version, e.g. 'transformers>=4.50'")
    return m.group(1), m.group(2).strip()


def installed_version(dist: str) -> str | None:
    try:
        return dist_version(dist)
    except PackageNotFoundError:
        return None


def unmet(requirements, feature: str = "run") -> list[tuple[str, str, str]]:
    """(library, installed version, requirement) for each installed library outside its declared range."""
    out = []
    for req in requirements:
        dist, spec = split(req)
        have = installed_version(dist)
        if have is not None and spec and not satisfies(have, spec):
            out.append((dist, have, spec))
    return out


def _what(feature: str) -> str:
    if feature.startswith("gemma"):
        return f"Gemma {feature.removeprefix('gemma')} specs"
    return {"run": "it", "decode": "--decode"}.get(feature, feature)


def check(name: str, requirements, feature: str = "run", error=BackendMissing) -> None:
    """Refuse implementation `name` (exit 2, one line) when an installed library is outside `requirements`, the
    range it declares for `feature`. parity.adapters.registry.require looks a built-in's ranges up."""
    found = unmet(requirements, feature)
    if found:
        dist, have, spec = found[0]
        raise error(
            f"implementation {name!r} needs {dist}{spec} for {_what(feature)}; {dist} {have} is installed: "
            f"pip install '{dist}{spec}' or drop {name} from {{option}} (docs/versions.md lists each feature's versions)",
            option="impls")
