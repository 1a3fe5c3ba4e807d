"""Which implementations a run has: names resolved to adapters, each checked against the spec and dtypes.

Everything here takes a selection (`Selection`, or the harness's `Request`,
which has the same fields): the spec, the implementation names (None: every
installed built-in), the dtypes, the reference and adapter overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parity.adapters import default_impls, get_adapter
from parity.adapters.declared import declared
from parity.adapters.offline import offline
from parity.errors import BackendMissing, ParityInputError, Unsupported, phase
from parity.model.spec import GemmaSpec


@dataclass
class Selection:
    spec: GemmaSpec
    impls: list[str] | None
    dtypes: list[str]
    reference: tuple[str, str]
    adapters: dict | None = None
    runtime: dict = field(default_factory=dict)  # run-wide runtime settings (parity.harness.Request.runtime)


def _adapter(req, name: str):
    if req.adapters and name in req.adapters:
        return req.adapters[name]
    return get_adapter(name, getattr(req, "runtime", None))


def resolve_impls(req) -> tuple[list[tuple[str, object]], dict[str, str]]:
    """(name, adapter) pairs to run, each checked against `req.spec` in every dtype, and the defaults skipped
    because their backend is missing (the registry's message) or they cannot build the spec."""
    explicit = req.impls is not None
    names = list(req.impls) if explicit else default_impls()
    seen, out, skipped = set(), [], {}
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        try:
            adapter = _adapter(req, name)
            for d in req.dtypes or ["float32"]:
                check_adapter(adapter, req.spec, d)
        except (BackendMissing, Unsupported) as e:
            if explicit:
                raise
            skipped[name] = str(e)
            continue
        out.append((name, adapter))
    return out, skipped


@offline()  # check() may import the library: it starts offline, as build() and run() do
def check_adapter(adapter, spec: GemmaSpec, dtype: str) -> None:
    """The one caller of `adapter.check`: bad input stays exit 2, anything else it raises is the implementation's
    (exit 3). Adapters' `build` may assume it passed, so every path to a build comes through here first."""
    from parity.adapters.registry import require_spec

    require_spec(declared(adapter).name, spec.family)  # the spec's family needs a newer library: one line
    with phase(declared(adapter).name, dtype, "check()"):
        adapter.check(spec, dtype)


def checked_impls(req, spec: GemmaSpec):
    """`resolve_impls`, and the reference checked too, against `spec`: unsupported combinations are refused
    before any work. Returns (impls, skipped, reference adapter)."""
    impls, skipped = resolve_impls(req)
    if spec != req.spec:  # a truncated depth (first_layers): what the runs will build
        for _, adapter in impls:
            for d in req.dtypes:
                check_adapter(adapter, spec, d)
    ref = _adapter(req, req.reference[0])
    check_adapter(ref, spec, req.reference[1])
    return impls, skipped, ref


@dataclass
class Elsewhere:
    """An implementation known by name and version only: it is checked and run in other processes."""

    name: str
    version_text: str
    decodes: bool = False

    def version(self) -> str:
        return self.version_text

    def needs_own_process(self) -> bool:
        return True


def resolve_elsewhere(req, spec: GemmaSpec):
    """`resolve_impls` and the checks, run in a child process (`python -m parity.capture --check`)."""
    import json
    import subprocess
    import sys

    ref_name, ref_dtype = req.reference
    cmd = [sys.executable, "-m", "parity.capture", "--check", "--spec-json", json.dumps(spec.to_dict()),
           "--dtypes", ",".join(req.dtypes), "--reference", f"{ref_name}@{ref_dtype}"]
    if req.impls is not None:
        cmd += ["--impls", ",".join(req.impls)]
    if getattr(req, "runtime", None):
        cmd += ["--settings", json.dumps(dict(req.runtime))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 2:
        raise ParityInputError((proc.stderr.strip().splitlines() or ["?"])[-1].removeprefix("parity: error: "))
    if proc.returncode != 0:
        raise RuntimeError(f"checking the implementations failed: {proc.stderr.strip()[-500:]}")
    got = json.loads(proc.stdout)
    impls = [(n, Elsewhere(a["name"], a["version"], a.get("decodes", False))) for n, a in got["impls"].items()]
    return impls, got["skipped"], Elsewhere(*got["reference"])
