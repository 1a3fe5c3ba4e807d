"""Baselines: a stored, reduced report, and the gate that compares a session's report with it.

A baseline keeps, per run (impl@dtype mode), prompt and tap, one number: the
**error** `max |actual - ref| / rms(ref)` (the tap's max_abs in units of the
reference tap's RMS, the unit the tolerance table uses), rounded to 3
significant digits; plus which taps were beyond tolerance, which were waived,
and the diagnosed causes. Nothing else: the full report is `report.json`.

The gate (`compare`), per tap present in both:

* **regression** when `now > max(factor * baseline, baseline + floor * tol)`,
  `tol` being the tap's tolerance in the same units (`atol * growth`: the
  dtype's atol, times sqrt(1 + depth) in cumulative mode). factor = 2 and
  floor = 0.05 by default: an error may double, and a zero-error tap may move
  by 5% of its tolerance, before the gate calls it a regression;
* **new divergence** when a tap that was within tolerance in the baseline is
  beyond it now, or a cause (impl@dtype, cause id) that the baseline did not
  diagnose as a divergence is diagnosed now;
* **improvement** (passes, and is listed) when `now < baseline / factor` and
  `baseline - now > floor * tol` (the mirror image of a regression), when a tap
  beyond tolerance in the baseline is within it now, or when a baseline
  divergence cause is gone;
* a waived tap or cause (see parity.gate.waivers) is never a regression or a new divergence;
* a run, prompt or tap of this session that the baseline lacks fails
  ("not in the baseline"); baseline runs this session did not run are listed;
* a baseline recorded for a different spec, weights, reference or prompts
  fails, naming the difference: it cannot say anything about this session.

`gate()` adds the files, pytest-regressions style: a missing baseline writes
`<name>.obtained.json` beside it and fails; a failing comparison writes the
obtained file too; `update=True` rewrites the baseline and still fails, so the
change is reviewed (and committed) before the gate passes on it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from parity.errors import ParityInputError
from parity.numerics.display import number
from parity.numerics.tolerances import growth

FORMAT = "parity-baseline/1"
FACTOR = 2.0
FLOOR = 0.05
MAX_LINES = 8  # per section of a message


def sig3(x: float) -> float:
    """x rounded to 3 significant digits (inf stays inf)."""
    if not math.isfinite(x) or x == 0:
        return x
    return float(f"{x:.3g}")


def tap_error(r) -> float:
    """max |actual - ref| in units of rms(ref); inf where the tap is not finite or has no shape match."""
    if not math.isfinite(r.max_abs):
        return math.inf
    if r.ref_rms > 0:
        return r.max_abs / r.ref_rms
    return 0.0 if r.max_abs == 0 else math.inf


def run_key(impl: str, dtype: str, mode: str) -> str:
    return f"{impl}@{dtype} {mode}"


def _enc(x: float):
    return "inf" if not math.isfinite(x) else sig3(x)


def _dec(x) -> float:
    if x is None or x == "inf":
        return math.inf
    return float(x)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reduce(report) -> dict:
    """The baseline of a report: errors per tap (3 significant digits), failing and waived taps, causes."""
    runs: dict[str, dict] = {}
    for run in report.runs:
        runs[run_key(*run.key)] = {"version": run.version, "errors": {}, "failed": {}, "waived": {}}
    for r in report.results:
        entry = runs.setdefault(run_key(r.impl, r.dtype, r.mode), {"version": "", "errors": {}, "failed": {},
                                                                    "waived": {}})
        entry["errors"].setdefault(r.prompt, {})[r.tap] = _enc(tap_error(r))
        if not r.passed:
            entry["failed"].setdefault(r.prompt, []).append(r.tap)
        if getattr(r, "waived", None):
            entry["waived"].setdefault(r.prompt, []).append(r.tap)
    for entry in runs.values():  # keep the file small: no empty sections
        for k in ("failed", "waived"):
            if not entry[k]:
                del entry[k]
    return {
        "format": FORMAT,
        "error": "max |actual - ref| / rms(ref) per tap, 3 significant digits",
        "config": config_of(report),
        "runs": runs,
        "causes": [{"impl": d.impl, "dtype": d.dtype, "cause": d.cause, "tap": d.tap, "severity": d.severity}
                   for d in report.diagnosis],
    }


def config_of(report) -> dict:
    """What the errors depend on: a baseline of another configuration says nothing about this one."""
    spec = report.spec.to_dict()
    return {
        "spec": spec.get("name"), "spec_hash": _digest(spec), "num_layers": spec.get("num_layers"),
        "weights": report.weights_hash, "reference": report.reference,
        "prompts": {k: len(v) for k, v in report.prompts.items()}, "prompts_hash": _digest(report.prompts),
        "tolerances": {k: v.atol for k, v in report.tolerances.items()},  # atol in units of rms(ref), per dtype
    }


def dumps(data: dict) -> str:
    return json.dumps(data, indent=1) + "\n"


def save(data: dict, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.part")
    tmp.write_text(dumps(data))
    tmp.replace(p)
    return p


def load(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ParityInputError(f"baseline {str(p)!r} does not exist; write it with --parity-update-baseline") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParityInputError(f"baseline {str(p)!r} is not valid JSON ({e}); restore it from version control "
                               "or rewrite it with --parity-update-baseline") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("runs"), dict):
        raise ParityInputError(f"baseline {str(p)!r} is not a {FORMAT} file; rewrite it with "
                               "--parity-update-baseline")
    return data


def obtained_path(path: str | Path) -> Path:
    """`fixtures/baseline.json` -> `fixtures/baseline.obtained.json`."""
    p = Path(path)
    return p.with_name(f"{p.stem}.obtained{p.suffix or '.json'}")


@dataclass
class Change:
    run: str  # "impl@dtype mode"
    prompt: str
    tap: str
    baseline: float
    now: float
    limit: float = math.nan

    def text(self) -> str:
        lim = f" (limit {number(self.limit)})" if math.isfinite(self.limit) else ""
        return f"{self.run} [{self.prompt}] {self.tap}: baseline {number(self.baseline)}, now {number(self.now)}{lim}"


@dataclass
class Gate:
    """The comparison of a session's reduced report with a baseline."""

    path: str = ""
    factor: float = FACTOR
    floor: float = FLOOR
    mismatch: list[str] = field(default_factory=list)  # configuration differences: nothing else is compared
    regressions: list[Change] = field(default_factory=list)
    new_divergences: list[str] = field(default_factory=list)
    improvements: list[str] = field(default_factory=list)
    not_in_baseline: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    waived: list[str] = field(default_factory=list)  # regressions/divergences not counted because waived
    compared: int = 0
    status: str = "compared"  # compared | missing | updated
    written: str | None = None  # the file this gate wrote (obtained or updated baseline)

    @property
    def passed(self) -> bool:
        return (self.status == "compared" and not self.mismatch and not self.regressions
                and not self.new_divergences and not self.not_in_baseline)

    def message(self) -> str:
        rule = (f"error = max|actual - ref| / rms(ref); a regression is now > max({self.factor:g} x baseline, "
                f"baseline + {self.floor:g} x tolerance)")
        if self.status == "missing":
            return (f"no baseline at {self.path}; wrote {self.written} from this session: review it, then rename it "
                    f"to {Path(self.path).name} (or rerun with --parity-update-baseline) and commit it")
        if self.status == "updated":
            return (f"baseline {self.path} rewritten from this session ({self.compared} taps): review the diff and "
                    "commit it, then rerun without --parity-update-baseline (this run fails so that the change "
                    "is reviewed)")
        lines = []
        if self.passed:
            lines.append(f"baseline {self.path}: PASS, {self.compared} taps within the baseline ({rule})")
        else:
            what = [f"{n} {k}" for n, k in ((len(self.mismatch), "configuration difference(s)"),
                                             (len(self.regressions), "regression(s)"),
                                             (len(self.new_divergences), "new divergence(s)"),
                                             (len(self.not_in_baseline), "entries not in the baseline")) if n]
            lines.append(f"baseline {self.path}: FAIL, " + ", ".join(what))
        if self.mismatch:
            lines += ["the baseline was recorded for another configuration:"] + [f"  {m}" for m in self.mismatch]
            lines.append("  pass --parity-baseline PATH for this configuration, or write one with "
                         "--parity-update-baseline")
        if self.regressions:
            lines.append(f"regressions ({rule}):")
            lines += _cap([f"  {c.text()}" for c in self.regressions])
        if self.new_divergences:
            lines.append("new divergences (within tolerance or not diagnosed in the baseline, failing now):")
            lines += _cap([f"  {d}" for d in self.new_divergences])
        if self.not_in_baseline:
            lines.append("not in the baseline (add them with --parity-update-baseline, or pass --parity-baseline):")
            lines += _cap([f"  {d}" for d in self.not_in_baseline])
        if self.improvements:
            lines.append(f"improved ({len(self.improvements)}; --parity-update-baseline records them):")
            lines += _cap([f"  {d}" for d in self.improvements])
        if self.waived:
            lines.append(f"waived, not counted ({len(self.waived)}):")
            lines += _cap([f"  {d}" for d in self.waived])
        if self.not_run:
            lines.append("in the baseline, not run in this session: " + ", ".join(self.not_run))
        if not self.passed and self.written:
            lines.append(f"this session's values: {self.written}; fix the regression, waive it (waivers file), or "
                         "accept it with --parity-update-baseline and commit the reviewed baseline")
        return "\n".join(lines)


def _cap(lines: list[str]) -> list[str]:
    return lines if len(lines) <= MAX_LINES else lines[:MAX_LINES] + [f"  ... and {len(lines) - MAX_LINES} more"]


def _tol(obtained: dict, run: str, tap: str) -> float:
    """The tap's tolerance in error units: the dtype's atol (x RMS) times the depth growth of its mode."""
    impl_dtype, mode = run.rsplit(" ", 1)
    dtype = impl_dtype.rsplit("@", 1)[1]
    atol = obtained["config"]["tolerances"].get(dtype, 0.0)
    return atol * growth(tap, int(obtained["config"].get("num_layers") or 0), mode)


def compare(baseline: dict, obtained: dict, factor: float = FACTOR, floor: float = FLOOR, path: str = "") -> Gate:
    """Compare two reduced reports (`reduce`): see the module docstring for the rules."""
    if factor < 1 or floor < 0:
        raise ParityInputError(f"baseline factor {factor} must be >= 1 and floor {floor} >= 0")
    g = Gate(path=path, factor=factor, floor=floor)
    bc, oc = baseline.get("config", {}), obtained["config"]
    for k, what in (("spec", "spec"), ("spec_hash", "spec fields"), ("weights", "weights hash"),
                    ("reference", "reference"), ("prompts", "prompts"), ("prompts_hash", "prompt tokens")):
        if bc.get(k) != oc.get(k):
            g.mismatch.append(f"{what}: baseline {bc.get(k)!r}, this session {oc.get(k)!r}")
    if g.mismatch:
        return g
    base_runs = baseline["runs"]
    g.not_run = [k for k in base_runs if k not in obtained["runs"]]
    for key, run in obtained["runs"].items():
        b = base_runs.get(key)
        if b is None:
            n = sum(len(t) for t in run["errors"].values())
            g.not_in_baseline.append(f"{key}: the whole run ({n} taps)")
            continue
        label = key if b.get("version", "") == run.get("version", "") else \
            f"{key} ({b.get('version')} -> {run.get('version')})"
        fixed: dict[str, list[str]] = {}
        for prompt, taps in run["errors"].items():
            btaps = b["errors"].get(prompt)
            if btaps is None:
                g.not_in_baseline.append(f"{key} prompt {prompt!r} ({len(taps)} taps)")
                continue
            bfail = set(b.get("failed", {}).get(prompt, []))
            ofail = set(run.get("failed", {}).get(prompt, []))
            owaived = set(run.get("waived", {}).get(prompt, []))
            missing = [t for t in taps if t not in btaps]
            if missing:
                g.not_in_baseline.append(f"{key} [{prompt}] taps {', '.join(missing[:4])}"
                                         + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
            newly = []
            for tap, val in taps.items():
                if tap not in btaps:
                    continue
                g.compared += 1
                base, now = _dec(btaps[tap]), _dec(val)
                margin = floor * _tol(obtained, key, tap)
                limit = max(factor * base, base + margin)
                if now > limit:
                    c = Change(label, prompt, tap, base, now, limit)
                    if tap in owaived:
                        g.waived.append(c.text() + " (waived)")
                    else:
                        g.regressions.append(c)
                elif math.isfinite(base) and now * factor < base and base - now > margin:
                    g.improvements.append(Change(label, prompt, tap, base, now).text())
                if tap in ofail and tap not in bfail:
                    if tap in owaived:
                        g.waived.append(f"{label} [{prompt}] {tap}: beyond tolerance (waived)")
                    else:
                        newly.append(tap)
                elif tap in bfail and tap not in ofail:
                    fixed.setdefault(prompt, []).append(tap)
            if newly:
                g.new_divergences.append(f"{label} [{prompt}]: {newly[0]} beyond tolerance"
                                         + (f", and {len(newly) - 1} more tap(s) after it" if len(newly) > 1 else ""))
        for prompt, taps in fixed.items():
            g.improvements.append(f"{label} [{prompt}]: {taps[0]}"
                                  + (f" and {len(taps) - 1} more tap(s)" if len(taps) > 1 else "")
                                  + " beyond tolerance in the baseline, within it now")
    ran = {k.rsplit(" ", 1)[0] for k in obtained["runs"]}
    bdiv = {(c["impl"], c["dtype"], c["cause"]) for c in baseline.get("causes", []) if c["severity"] == "divergence"}
    odiv = {(c["impl"], c["dtype"], c["cause"]) for c in obtained.get("causes", [])
            if c["severity"] in ("divergence", "waived")}  # a waived cause is still there, not gone
    for c in obtained.get("causes", []):
        k = (c["impl"], c["dtype"], c["cause"])
        if c["severity"] == "divergence" and k not in bdiv:
            g.new_divergences.append(f"{c['impl']}@{c['dtype']}: cause {c['cause']} at {c['tap']}")
        elif c["severity"] == "waived" and k not in bdiv:
            g.waived.append(f"{c['impl']}@{c['dtype']}: cause {c['cause']} at {c['tap']} (waived)")
    for c in baseline.get("causes", []):
        k = (c["impl"], c["dtype"], c["cause"])
        if c["severity"] == "divergence" and k not in odiv and f"{c['impl']}@{c['dtype']}" in ran:
            g.improvements.append(f"{c['impl']}@{c['dtype']}: cause {c['cause']} (at {c['tap']} in the baseline) "
                                  "is gone")
    return g


def gate(report, path: str | Path, update: bool = False, factor: float = FACTOR, floor: float = FLOOR) -> Gate:
    """Compare `report` with the baseline file at `path`, writing files the pytest-regressions way."""
    p = Path(path)
    obtained = reduce(report)
    n = sum(len(t) for run in obtained["runs"].values() for t in run["errors"].values())
    if update:
        save(obtained, p)
        return Gate(path=str(path), status="updated", written=str(p), compared=n)
    if not p.exists():
        o = save(obtained, obtained_path(p))
        return Gate(path=str(path), status="missing", written=str(o), compared=n)
    g = compare(load(p), obtained, factor, floor, path=str(path))
    if not g.passed:
        g.written = str(save(obtained, obtained_path(p)))
    return g
