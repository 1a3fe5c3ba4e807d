"""Parity checks as plain functions that raise AssertionError with a readable message.

The parity suite (`pytest parity`) calls them on every implementation's
traces; the harness's own tests call them on deliberately wrong variants to
show each one can fail; users call them in their own tests.
"""

from __future__ import annotations

from parity.compare.pairs import TapResult
from parity.diagnose.probes.head import probe_embedding
from parity.diagnose.probes.mlp import probe_geglu, probe_gelu
from parity.diagnose.probes.norms import probe_attn_norm, probe_final_norm, probe_norm_placement
from parity.model.spec import GemmaSpec
from parity.capture.trace import Trace

MAX_LINES = 8


class CheckFailure(AssertionError):
    """A failed parity check; `causes` are the cause ids its probes named (empty for a tolerance check).

    The message is for people; waivers and tools read `causes`.
    """

    def __init__(self, message: str, causes=()) -> None:
        super().__init__(message)
        self.causes = frozenset(c for c in causes if c)


def _fail(lines: list[str], what: str, causes=()) -> None:
    if lines:
        more = f"\n... and {len(lines) - MAX_LINES} more" if len(lines) > MAX_LINES else ""
        raise CheckFailure(f"{what}:\n" + "\n".join(lines[:MAX_LINES]) + more, causes)


def check_within_tolerance(results: list[TapResult], what: str = "taps beyond tolerance") -> None:
    _fail([r.message() for r in results if not r.passed], what)


def check_norm_placement(trace: Trace, spec: GemmaSpec) -> None:
    """Gemma 1: a norm before attention and before the MLP, none after. Gemma 2/3: sandwich."""
    lines = []
    has_post = [t for t in trace.taps if t.endswith(("post_attn_norm", "post_mlp_norm"))]
    if spec.norm_placement == "pre" and has_post:
        lines.append(f"{trace.label} exposes post-sub-layer norms {has_post[:2]} but the spec is pre-norm")
    causes = []
    for i in range(spec.num_layers):
        p = probe_norm_placement(trace, spec, i)
        if p.status != "ok":
            lines.append(f"{trace.label} {p.sentence()}")
            causes.append(p.cause)
    _fail(lines, f"norm placement is not {spec.norm_placement}", causes)


def check_norm_unit_offset(trace: Trace, spec: GemmaSpec, weights: dict) -> None:
    """RMSNorm multiplies by (1 + w) in fp32 and casts after, before attention and at the end."""
    probes = [probe_attn_norm(trace, spec, weights, i) for i in range(spec.num_layers)]
    probes.append(probe_final_norm(trace, spec, weights))
    bad = [p for p in probes if p.cause]
    _fail([f"{trace.label} {p.sentence()} -> {p.cause}" for p in bad], "RMSNorm is not Gemma's", [p.cause for p in bad])


def check_geglu(trace: Trace, spec: GemmaSpec) -> None:
    """mlp.hidden = gelu(gate) * up, both projections intermediate_size wide."""
    lines, causes = [], []
    for i in range(spec.num_layers):
        for p in (probe_geglu(trace, spec, i), probe_gelu(trace, i, approximate=spec.gelu_approximate)):
            if p.cause in ("geglu-swapped", "geglu-width", "unexplained") or p.status == "cannot-tell":
                lines.append(f"{trace.label} {p.sentence()} -> {p.cause}")
                causes.append(p.cause)
    _fail(lines, "the MLP is not gelu(gate) * up with two half-width projections", causes)


def check_gelu_tanh(trace: Trace, spec: GemmaSpec) -> None:
    """The GELU is the spec's: the tanh approximation (rounded once, or op by op: both are tanh), or the exact
    form where the spec asks for it."""
    lines, causes = [], []
    want = "tanh" if spec.gelu_approximate == "tanh" else "exact"
    for i in range(spec.num_layers):
        p = probe_gelu(trace, i, approximate=spec.gelu_approximate)
        if not (p.finding or "").startswith(want) or p.cause not in (None, "act-lowp"):
            lines.append(f"{trace.label} {p.sentence()} -> {p.cause}")
            causes.append(p.cause)
    _fail(lines, "the GELU is not the tanh approximation", causes)


def check_embedding_scale(trace: Trace, spec: GemmaSpec, weights: dict) -> None:
    p = probe_embedding(trace, spec, weights)
    _fail([f"{trace.label} {p.sentence()} -> {p.cause}"] if p.cause else [], "the embedding scale is wrong", [p.cause])
