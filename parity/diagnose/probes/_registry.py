"""The probe registry: each probe module registers its probes, with the cause ids each can name.

A new probe is one module under parity/diagnose/probes/ that calls `register`
(the package imports each of its modules); `run_probes` iterates the registry. A
cause id the catalogue lacks fails here, at import, not in a report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from parity.diagnose.probes._evidence import Probe, ProbeDefinitionError, known_cause


@dataclass(frozen=True)
class ProbeSpec:
    """One registered probe.

    `fn(trace, spec, weights, layer)` for a per-layer probe, `fn(trace, spec, weights)` otherwise; it returns
    a Probe or a list of them. `tap` is the tap it reports on ("layers.{}.mlp.act" for a per-layer probe):
    probes run in the forward order of their taps (registration order breaking ties), and a probe whose taps
    do not fit is reported there. `causes`: every cause id it may name, `unexplained` included.
    """

    name: str
    fn: Callable[..., Probe | list[Probe]]
    tap: str
    per_layer: bool
    causes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.per_layer != ("{}" in self.tap):
            raise ProbeDefinitionError(f"probe {self.name!r}: tap {self.tap!r} with per_layer={self.per_layer}; a "
                                       "per-layer probe's tap has a '{}' for the layer, a whole-model one has none")
        if not self.causes:
            raise ProbeDefinitionError(f"probe {self.name!r} declares no cause ids; list those it can name")
        for c in self.causes:
            known_cause(c, f"probe {self.name!r} (registered cause)")

    def tap_at(self, layer: int | None) -> str:
        return self.tap.format(layer) if self.per_layer else self.tap


PROBES: dict[str, ProbeSpec] = {}  # name -> spec, in registration order


def register(spec: ProbeSpec) -> ProbeSpec:
    """Add a probe to the registry (its cause ids were checked against the catalogue when `spec` was made)."""
    if spec.name in PROBES:
        raise ProbeDefinitionError(f"a probe named {spec.name!r} is already registered; pick another name "
                                   "(or `unregister` it first)")
    PROBES[spec.name] = spec
    return spec


def unregister(name: str) -> ProbeSpec:
    """Remove a probe from the registry (a test's toy probe, cleaning up after itself)."""
    return PROBES.pop(name)
