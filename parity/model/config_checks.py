"""Typed reading of a config.json's values, field by field: no coercion, nothing non-finite.

A HuggingFace config.json is JSON written by people and scripts. Python's json
module accepts `NaN` and `Infinity` (and reads `1e400` as infinity), and a
plain `int()` or `bool()` would turn 64.7 into 64, `true` into 1 layer and the
string "false" into True. Every value the spec reads goes through one of the
readers here instead, and a value of the wrong type, out of range or not
finite is bad input: one line naming the field, the value, the limit and the
fix (ParityInputError, exit 2).

Integers must be JSON integers: 64.0 is refused too, because HF passes it on
as a float (torch's `nn.Linear(64.0, ...)` raises), so the implementations
would not even agree on whether it is a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from parity.errors import ParityInputError

MAX_DIM = 2**31 - 1  # a tensor dimension beyond int32 is no Gemma (the largest is 262,208) and overflows some kernels
MAX_LAYERS = 4096  # per-layer tuples are built from it before any size estimate; real Gemmas have 18 to 62
MISSING = object()


class ConfigReader:
    """Reads one config object's fields, naming them as `prefix + key` in `where`'s messages."""

    def __init__(self, cfg: dict, where: str, prefix: str = "") -> None:
        self.cfg, self.where, self.prefix = cfg, where, prefix

    def bad(self, key: str, value: Any, limit: str, fix: str) -> ParityInputError:
        return ParityInputError(f"{self.where}: {self.prefix}{key}={_show(value)} {limit}; {fix}")

    def get(self, key: str, default: Any = MISSING) -> Any:
        if key not in self.cfg:
            if default is MISSING:
                raise ParityInputError(f"{self.where}: config.json has no '{self.prefix}{key}'; add it (HF Gemma "
                                       "configs always carry it)")
            return default
        return self.cfg[key]

    def integer(self, key: str, default: Any = MISSING, low: int = 1, high: int = MAX_DIM,
                nullable: bool = False) -> int | None:
        v = self.get(key, default)
        if v is None and nullable:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.bad(key, v, f"is not an integer{' or null' if nullable else ''}",
                           f"write a whole number in {low}..{high} without a decimal point")
        if not low <= v <= high:
            raise self.bad(key, v, f"is outside {low}..{high}", "give a value in that range")
        return v

    def number(self, key: str, default: Any = MISSING, positive: bool = True, nullable: bool = False,
               below: float | None = None) -> float | None:
        v = self.get(key, default)
        if v is None and nullable:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise self.bad(key, v, f"is not a number{' or null' if nullable else ''}",
                           "write a finite JSON number" + (" or null" if nullable else ""))
        if not math.isfinite(v):
            raise self.bad(key, v, "is not finite", "write a finite JSON number" + (" or null" if nullable else ""))
        if positive and v <= 0:
            raise self.bad(key, v, "must be positive", "give a value above 0" + (" or null" if nullable else ""))
        if below is not None and v >= below:
            raise self.bad(key, v, f"must be below {below}", "Gemma uses 1e-6")
        return float(v)

    def boolean(self, key: str, default: Any = MISSING) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.bad(key, v, "is not a boolean", "write true or false (JSON, without quotes)")
        return v

    def choice(self, key: str, allowed, default: Any = MISSING, nullable: bool = False):
        v = self.get(key, default)
        if v is None and nullable:
            return None
        if not isinstance(v, str) or v not in allowed:
            raise self.bad(key, v, "is not allowed", f"use one of {', '.join(map(str, allowed))}")
        return v

    def string(self, key: str, default: Any = MISSING) -> str:
        v = self.get(key, default)
        if not isinstance(v, str):
            raise self.bad(key, v, "is not a string", "write a JSON string")
        return v

    def obj(self, key: str, nullable: bool = True) -> "ConfigReader | None":
        """The nested object at `key` as a reader of its own (None when absent or null and `nullable`)."""
        v = self.cfg.get(key)
        if v is None and nullable:
            return None
        if not isinstance(v, dict):
            raise self.bad(key, v, "is not a JSON object", "give an object {...}" + (" or null" if nullable else ""))
        return ConfigReader(v, self.where, f"{self.prefix}{key}.")

    def string_list(self, key: str, allowed, length: int | None = None) -> list[str] | None:
        v = self.get(key, None)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) and x in allowed for x in v):
            bad = next((x for x in v if not (isinstance(x, str) and x in allowed)), v) if isinstance(v, list) else v
            raise self.bad(key, v if not isinstance(v, list) else f"[... {_show(bad)} ...]",
                           "is not a list of layer types", f"use a list of {' and '.join(allowed)}")
        if length is not None and len(v) != length:
            raise self.bad(key, f"[{len(v)} entries]", f"does not have num_hidden_layers={length} entries",
                           "give one entry per layer")
        return v

    def only(self, known) -> None:
        """Refuse keys outside `known` (for parity's own namespace, where a typo would be silently ignored)."""
        unknown = sorted(set(self.cfg) - set(known))
        if unknown:
            raise ParityInputError(f"{self.where}: {self.prefix}{unknown[0]} is not a field parity knows; use one "
                                   f"of {', '.join(sorted(known))}")


def _show(v: Any) -> str:
    text = json.dumps(v, allow_nan=True) if isinstance(v, (int, float, bool, type(None))) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------ the file
class _NonFinite(float):
    """A `NaN`/`Infinity` token as parsed, remembered by its spelling so the message can quote it."""

    def __new__(cls, token: str):
        self = super().__new__(cls, token.replace("Infinity", "inf"))
        self.token = token
        return self


def read_config_file(path: str | Path) -> tuple[dict, Path]:
    """The JSON object in a config.json (or a directory holding one), checked before any field is read.

    Refused: a missing file, a directory without config.json, a file that is not JSON (named by line and
    column), a top-level value that is not an object, and a non-finite number anywhere in the file
    (`NaN`, `Infinity`, or a literal like 1e400 that overflows to infinity), named by its path of keys.
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ParityInputError(f"--spec {str(path)!r} is a directory without a config.json; give the file "
                                   "itself, its directory, or a preset name")
        p = p / "config.json"
    if not p.is_file():
        raise ParityInputError(f"config file {str(p)!r} does not exist; give a preset name or a path to config.json")
    try:
        cfg = json.loads(p.read_bytes().decode("utf-8"), parse_constant=_NonFinite)
    except UnicodeDecodeError as e:
        raise ParityInputError(f"{p}: not UTF-8 text (byte {e.start}); save config.json as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ParityInputError(f"{p}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the file "
                               "or pass a preset name") from None
    except RecursionError:
        raise ParityInputError(f"{p}: nested too deeply to be a config.json; fix the file") from None
    if not isinstance(cfg, dict):
        raise ParityInputError(f"{p}: holds a JSON {type(cfg).__name__}, not an object; a config.json is "
                               "one object {{...}} of fields")
    where = _non_finite(cfg)
    if where is not None:
        key, v = where
        token = getattr(v, "token", None) or repr(v)
        raise ParityInputError(f"{p}: {key}={token} is not a finite number (JSON has no NaN or Infinity); "
                               "write a finite number, or null where the field allows it")
    return cfg, p


def _non_finite(v: Any, key: str = "") -> tuple[str, float] | None:
    """The first non-finite number's dotted key path (list items as [i]), or None."""
    if isinstance(v, float) and not math.isfinite(v):
        return key or "(top level)", v
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        found = _non_finite(x, f"{key}[{k}]" if isinstance(k, int) else (f"{key}.{k}" if key else str(k)))
        if found:
            return found
    return None
