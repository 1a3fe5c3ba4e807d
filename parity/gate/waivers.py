"""Waivers: accepted, dated divergences, read from a TOML file (`fixtures/waivers.toml` by default).

    [[waiver]]
    impl = "swapped-geglu"        # the implementation's name, as in report.json "impl"
    tap = "*"                     # glob over tap names (fnmatch): "layers.*.mlp.*", "logits", "*"
    dtype = "float32"             # a dtype, or "*" for every dtype
    cause = "geglu-swapped"       # a cause id from docs/causes.md (or "unexplained")
    reason = "upstream fix pending, see issue 12"
    expires = 2026-06-30          # a TOML date (or "2026-06-30"); the waiver holds through that day

What a waiver does, applied to a report by `apply_waivers`:

* a diagnosis entry (severity "divergence") whose impl, dtype and cause match
  and whose tap matches the glob becomes severity "waived" and gets
  `"waived": "<reason> (expires <date>)"`, so `Report.divergent_causes` no
  longer lists it;
* a tap of a run (impl@dtype, either mode) whose diagnosis names the
  waiver's cause, and whose name matches the glob, is marked waived
  (`TapResult.waived`, the same text): the tolerance checks leave it out, and
  the baseline gate does not count its growth;
* an expired waiver waives nothing: the divergence stays, and its evidence
  names the waiver and the date it expired, so the failing check says why.

Nothing here loosens a tolerance: a waived tap keeps its numbers and its
`passed: false`; the waiver only says it is accepted, and until when.

Bad input (not TOML, a missing or unknown key, a cause id not in the
catalogue, a malformed date, an unknown dtype) is one-line `ParityInputError`.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from parity.diagnose.causes import CAUSE_IDS, check_cause  # CAUSE_IDS stays importable from here
from parity.errors import ParityInputError

DTYPES = ("float64", "float32", "bfloat16", "float16")
KEYS = ("impl", "tap", "dtype", "cause", "reason", "expires")


@dataclass(frozen=True)
class Waiver:
    impl: str
    tap: str  # glob over tap names
    dtype: str  # a dtype or "*"
    cause: str
    reason: str
    expires: _dt.date
    where: str = ""  # "<file> waiver #<n>", for messages

    @property
    def note(self) -> str:
        return f"{self.reason} (expires {self.expires.isoformat()})"

    @property
    def label(self) -> str:
        return f"{self.where}: {self.impl}@{self.dtype} {self.cause} at {self.tap!r}"

    def expired(self, today: _dt.date) -> bool:
        return today > self.expires

    def covers(self, impl: str, dtype: str, tap: str, cause: str | None = None) -> bool:
        return (impl == self.impl and (self.dtype == "*" or dtype == self.dtype)
                and (cause is None or cause == self.cause) and fnmatch.fnmatchcase(tap, self.tap))


@dataclass
class Applied:
    """What `apply_waivers` did to a report."""

    waived: list[tuple] = field(default_factory=list)  # (Finding, the waiver that holds)
    expired: list[tuple] = field(default_factory=list)  # (Finding, the expired waiver)
    taps: int = 0  # tap results marked waived
    unused: list[Waiver] = field(default_factory=list)  # waivers that matched nothing in this report

    def lines(self) -> list[str]:
        out = [f"waived: {d.impl}@{d.dtype} {d.cause} at {d.tap}: {w.note} [{w.where}]" for d, w in self.waived]
        out += [f"EXPIRED waiver {w.label} expired on {w.expires.isoformat()} ({w.reason}): "
                f"{d.impl}@{d.dtype} {d.cause} at {d.tap} fails again; renew or remove it"
                for d, w in self.expired]
        if self.taps:
            out.append(f"{self.taps} tap result(s) beyond tolerance are waived (still reported, passed: false)")
        out += [f"unused waiver {w.label} (expires {w.expires.isoformat()}): matched nothing in this session"
                for w in self.unused]
        return out


def _date(value, where: str) -> _dt.date:
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
        try:
            return _dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ParityInputError(f"{where}: expires = {value!r} is not a date; write it as YYYY-MM-DD, "
                           "e.g. expires = 2026-06-30")


def parse_waivers(text: str, source: str = "waivers.toml") -> list[Waiver]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        for n, line in enumerate(text.splitlines(), 1):  # an unquoted bad date is a TOML error: say what it is
            m = re.match(r"\s*expires\s*=\s*([^\s#\"']+)", line)
            if m:
                try:
                    tomllib.loads(f"x = {m.group(1)}")
                except tomllib.TOMLDecodeError:
                    _date(m.group(1), f"{source} line {n}")
        raise ParityInputError(f"{source}: not valid TOML ({e}); fix the file") from None
    extra = sorted(set(data) - {"waiver"})
    if extra:
        raise ParityInputError(f"{source}: unknown top-level key(s) {extra}; list waivers as [[waiver]] tables")
    entries = data.get("waiver", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ParityInputError(f"{source}: 'waiver' must be an array of tables ([[waiver]] ...)")
    out = []
    for n, e in enumerate(entries, 1):
        where = f"{source} waiver #{n}"
        missing = [k for k in KEYS if k not in e]
        unknown = sorted(set(e) - set(KEYS))
        if missing or unknown:
            raise ParityInputError(f"{where}: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown key(s) {', '.join(unknown)}"]
                                                                         if unknown else []))
                + f"; each waiver needs exactly {', '.join(KEYS)}")
        for k in ("impl", "tap", "dtype", "cause", "reason"):
            if not isinstance(e[k], str) or not e[k].strip():
                raise ParityInputError(f"{where}: {k} = {e[k]!r} must be a non-empty string")
        check_cause(e["cause"], where)
        if e["dtype"] != "*" and e["dtype"] not in DTYPES:
            raise ParityInputError(f"{where}: dtype {e['dtype']!r} is not a dtype; use one of {', '.join(DTYPES)} "
                                   "or '*'")
        out.append(Waiver(impl=e["impl"].strip(), tap=e["tap"].strip(), dtype=e["dtype"], cause=e["cause"],
                          reason=" ".join(e["reason"].split()), expires=_date(e["expires"], where), where=where))
    return out


def load_waivers(path: str | Path, shown: str | None = None) -> list[Waiver]:
    """The waivers in a TOML file; `shown` is how messages name the file (default: the path)."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ParityInputError(f"waiver file {str(p)!r} does not exist; give an existing TOML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParityInputError(f"waiver file {str(p)!r} cannot be read ({e}); fix its permissions or encoding") \
            from None
    return parse_waivers(text, shown or str(path))


def apply_waivers(report, waivers: list[Waiver], today: _dt.date | None = None) -> Applied:
    """Mark the report's waived divergences and tap results (in place); see the module docstring."""
    today = today or _dt.date.today()
    applied = Applied()
    used: set[int] = set()
    findings = []
    for d in report.diagnosis:
        if d.severity != "divergence":
            findings.append(d)
            continue
        hits = [w for w in waivers if w.covers(d.impl, d.dtype, d.tap, d.cause)]
        live = [w for w in hits if not w.expired(today)]
        used.update(id(w) for w in hits)
        if live:
            d = replace(d, severity="waived", waived=live[0].note)
            applied.waived.append((d, live[0]))
        elif hits:
            w = max(hits, key=lambda w: w.expires)
            d = replace(d, waiver_expired=f"{w.where} expired on {w.expires.isoformat()}",
                        evidence=f"{d.evidence} [waiver {w.where} ({w.reason}) expired on "
                                 f"{w.expires.isoformat()}: renew or remove it]")
            applied.expired.append((d, w))
        findings.append(d)
    report.diagnosis = findings  # new findings replace the old: a Finding is never edited
    # causes now accepted per run: a failing tap is waived only where its run's diagnosis names the cause
    accepted: dict[tuple[str, str], set[str]] = {}
    for d, _ in applied.waived:
        accepted.setdefault((d.impl, d.dtype), set()).add(d.cause)
    for r in report.results:
        causes = accepted.get((r.impl, r.dtype), set())
        for w in waivers:
            if w.cause in causes and not w.expired(today) and w.covers(r.impl, r.dtype, r.tap):
                r.waived = w.note  # within tolerance too: the baseline gate does not count a waived tap's growth
                applied.taps += not r.passed
                break
    applied.unused = [w for w in waivers if id(w) not in used]
    return applied


def is_waived(result) -> bool:
    """A tap result that a waiver accepts (see `apply_waivers`)."""
    return bool(getattr(result, "waived", None))


def unwaived(results: list) -> list:
    """The tap results that count for the tolerance checks: all but the waived ones."""
    return [r for r in results if not is_waived(r)]


def waived_causes(report, impl: str, dtype: str) -> dict[str, str]:
    """cause id -> waiver note, for the run's waived diagnosis entries."""
    return {d.cause: d.waived for d in report.diagnosis if (d.impl, d.dtype) == (impl, dtype) and d.severity == "waived"}


def explains_failure(report, impl: str, dtype: str, message: str, causes=None) -> str | None:
    """The waiver note when a failed check of impl@dtype is explained by waived causes alone, else None.

    Used for the probe-based checks (GELU, GeGLU, norms, embedding), whose
    messages name the cause id each probe found: the failure is waived when
    the run's only divergences are waived ones, the message names at least one
    waived cause id, and it names no cause id that is not waived.
    """
    waived = waived_causes(report, impl, dtype)
    if not waived:
        return None
    if any((d.impl, d.dtype) == (impl, dtype) and d.severity == "divergence" for d in report.diagnosis):
        return None
    if causes is not None:  # a parity.gate.checks.CheckFailure says which causes its probes named
        named = set(causes)
    else:
        named = {c for c in CAUSE_IDS if re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", message)}
    if not named or not named <= set(waived):
        return None
    return "; ".join(f"{c}: {waived[c]}" for c in sorted(named))
