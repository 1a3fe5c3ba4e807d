"""What an adapter has, read in one place: its required members, and its optional ones with the documented defaults.

Adapters may be duck-typed (any object with the REQUIRED members;
parity.adapters.get_adapter refuses a user's adapter without them), so an
optional member can be absent; its default here is the one parity.adapters.base
documents, and the rest of parity reads `declared(adapter)` instead of probing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

REQUIRED = ("name", "version", "check", "build", "run")  # parity.adapters.base.Adapter's abstract interface


def missing_members(adapter) -> list[str]:
    """The required members `adapter` lacks, in REQUIRED's order."""
    return [m for m in REQUIRED if not hasattr(adapter, m)]


@dataclass(frozen=True)
class Declared:
    name: str  # the adapter's name; its class name for an object without one (req.adapters may hold anything)
    cannot: Mapping[str, str] = field(default_factory=dict)  # taps it can never give -> why
    decodes: bool = False  # `decode` is implemented
    full_cache_taps: bool = False  # `run(..., cache_taps=True)` also returns each layer's keys and values
    own_process: bool = False  # `needs_own_process()`: it must be captured in a fresh process
    settings: Mapping[str, str] = field(default_factory=dict)  # `settings()`: choices shown with its runs


def declared(adapter) -> Declared:
    """`adapter`'s optional members, each defaulted when absent.

    `own_process` is asked when this is called, not once per adapter: keras's answer changes once
    another backend has been imported into the process, so read it just before deciding where to capture.
    """
    own = getattr(adapter, "needs_own_process", None)
    return Declared(
        name=getattr(adapter, "name", type(adapter).__name__),
        cannot=MappingProxyType(dict(getattr(adapter, "cannot", None) or {})),
        decodes=bool(getattr(adapter, "decodes", False)),
        full_cache_taps=bool(getattr(adapter, "full_cache_taps", False)),
        own_process=bool(own()) if callable(own) else False,
        settings=MappingProxyType({str(k): str(v) for k, v in (_call(adapter, "settings") or {}).items()}),
    )


def _call(adapter, member: str):
    fn = getattr(adapter, member, None)
    return fn() if callable(fn) else None


def held(adapter, spec, weights, dtype):
    """`adapter.held(...)` (parity.adapters.base.Held) or None when it lacks the member or holds the weights
    it was given."""
    fn = getattr(adapter, "held", None)
    return fn(spec, weights, dtype) if callable(fn) else None
