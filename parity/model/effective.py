"""The effective configuration as data: the numeric properties every implementation reports, typed, and
compared by value against the reference's.

Every built-in adapter's `effective(model)` reads these properties back from the model it built (never
copied from the spec unless the library has no such setting: then `NOT_A_SETTING`) and returns
`report(values, library)`: one JSON-safe dict, the properties under their names plus a `library`
sub-dict of facts only that library has (class names, backend, cache type, rounding details). The dict
travels in traces and report.json as is; `parse` turns it back into typed values and `differences`
compares a run's against the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

LIBRARY = "library"  # the key of the library-specific facts in an effective dict


@dataclass(frozen=True)
class Unread:
    """A property an implementation cannot report: shown as its reason, never a difference."""
    reason: str

    def __str__(self) -> str:
        return self.reason


NOT_A_SETTING = Unread("not a setting of this library")
NOT_REPORTED = Unread("not reported")  # an implementation (a plug-in, an old trace) that left the property out


@dataclass(frozen=True)
class Property:
    name: str
    kind: type  # bool, int, float or str: the type of the value (of each layer's value when per_layer)
    doc: str
    per_layer: bool = False  # a tuple with one value per layer
    optional: bool = False  # None is a value ("no softcap", "global layer")
    rounded: bool = False  # rounded to the run's activation dtype by design: compared within its precision
    render: Callable[[Any], str] | None = None  # how a value reads (default: value_text)


def _geglu(v: str) -> str:
    return {"gate": "gelu(gate) * up", "up": "gelu(up) * gate"}.get(v, v)


# The spec's numeric choices (parity.model.spec.GemmaSpec), under the spec field's name where there is one.
PROPERTIES: tuple[Property, ...] = (
    Property("vocab_size", int, "rows of the embedding"),
    Property("hidden_size", int, "width of the residual stream"),
    Property("intermediate_size", int, "width of each GeGLU half"),
    Property("num_layers", int, "decoder blocks"),
    Property("num_heads", int, "query heads"),
    Property("num_kv_heads", int, "key/value heads"),
    Property("head_dim", int, "width of one head"),
    Property("norm_unit_offset", bool, "RMSNorm multiplies by (1 + w), not w"),
    Property("norm_placement", str, "pre (Gemma 1) or sandwich (norms after each sub-layer too)"),
    Property("norm_eps", float, "RMSNorm epsilon (layer 0's first norm)"),
    Property("final_norm", bool, "a norm before the head"),
    Property("gelu_approximate", str, "tanh or none (exact erf GELU)"),
    Property("geglu", str, "the projection the GELU is applied to", render=_geglu),
    Property("embed_scale", float, "what the embeddings are multiplied by (1: unscaled)", rounded=True),
    Property("embed_scale_dtype", str, "the dtype that multiplier is rounded to: activation or float32"),
    Property("tied_head", bool, "the head is the embedding"),
    Property("query_scale", float, "what attention scores are multiplied by", per_layer=True),
    Property("rope_base", float, "RoPE base frequency", per_layer=True),
    Property("rope_scaling_factor", float, "linear RoPE position scaling (1: none)", per_layer=True),
    Property("attn_softcap", float, "attention-logit softcap (none: no cap)", per_layer=True, optional=True),
    Property("final_softcap", float, "final-logit softcap (none: no cap)", optional=True),
    Property("sliding_window", int, "keys a local layer sees (none: a global layer)", per_layer=True,
             optional=True),
    Property("qk_norm", bool, "RMSNorm on q and k before RoPE"),
)
BY_NAME = {p.name: p for p in PROPERTIES}
RTOL = 1e-6  # floats compare by value within this relative tolerance
ROUNDING = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}  # the relative precision of a `rounded` property


@dataclass(frozen=True)
class Difference:
    """One property whose value differs from the reference's: what a later stage names as a cause."""
    run: str  # impl@dtype
    property: str
    reference: Any
    value: Any


# ------------------------------------------------------------------ the adapter side
def report(values: dict[str, Any], library: dict[str, Any] | None = None) -> dict:
    """The effective dict an adapter returns: every property, type-checked, JSON-safe, plus `library`.

    A property missing, unknown or of the wrong type is a bug in the adapter: it raises, naming it.
    """
    missing = [p.name for p in PROPERTIES if p.name not in values]
    unknown = sorted(set(values) - set(BY_NAME))
    if missing or unknown:
        raise ValueError(f"effective(): missing properties {missing}, unknown {unknown}; report exactly the ones "
                         "of parity.model.effective.PROPERTIES (library facts go under library)")
    out = {p.name: _encode(p, values[p.name]) for p in PROPERTIES}
    out[LIBRARY] = dict(library or {})
    return out


def _encode(p: Property, v):
    if isinstance(v, Unread):
        return {"unread": v.reason}
    if p.per_layer:
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"effective(): {p.name}={v!r} must be one value per layer")
        return [_scalar(p, x) for x in v]
    return _scalar(p, v)


def _scalar(p: Property, x):
    if x is None and p.optional:
        return None
    if p.kind is float and isinstance(x, int) and not isinstance(x, bool):
        x = float(x)
    if p.kind is int and hasattr(x, "__index__") and not isinstance(x, bool):
        x = int(x)
    if p.kind is float and hasattr(x, "item") and not isinstance(x, bool):  # a numpy or torch scalar
        x = float(x)
    if type(x) is not p.kind:
        raise ValueError(f"effective(): {p.name}={x!r} is a {type(x).__name__}, not a {p.kind.__name__}")
    return x


# ------------------------------------------------------------------ the report side
def parse(d: dict | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(typed properties, library facts) from an effective dict. Keys that are no property (a plug-in's own,
    an older trace's free text) join the library facts; a property left out reads NOT_REPORTED."""
    d = dict(d or {})
    library = dict(d.pop(LIBRARY, None) or {})
    props = {}
    for p in PROPERTIES:
        if p.name not in d:
            props[p.name] = NOT_REPORTED
            continue
        v = d.pop(p.name)
        if isinstance(v, dict) and set(v) == {"unread"}:
            props[p.name] = Unread(str(v["unread"]))
        elif p.per_layer and isinstance(v, list):
            props[p.name] = tuple(v)
        else:
            props[p.name] = v
    library.update(d)
    return props, library


def normalized(d: dict | None) -> dict:
    """An effective dict in report.json's shape whatever wrote it: every property (`{"unread": why}` where
    none was read), then `library` holding everything else."""
    props, library = parse(d)
    out = {p.name: ({"unread": v.reason} if isinstance(v, Unread) else list(v) if isinstance(v, tuple) else v)
           for p, v in ((p, props[p.name]) for p in PROPERTIES)}
    out[LIBRARY] = library
    return out


def same(p: Property, a, b, dtype: str = "float64") -> bool:
    """Whether two values of property p are equal: floats within RTOL (within the dtype's precision for a
    rounded property), tuples element by element."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(same(p, x, y, dtype) for x, y in zip(a, b)))
    if p.kind is float and _number(a) and _number(b):
        rtol = max(RTOL, ROUNDING.get(dtype, 0.0)) if p.rounded else RTOL
        return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0) or a == b
    return type(a) is type(b) and a == b


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def differences(effective: dict[str, dict], reference: str) -> list[Difference]:
    """Each (run, property) whose value differs from the reference run's, in run then property order.

    An Unread value on either side is not compared: nothing is known to differ.
    """
    if reference not in effective:
        return []
    ref, _ = parse(effective[reference])
    out = []
    for run, d in effective.items():
        if run == reference:
            continue
        props, _ = parse(d)
        dtype = run.rsplit("@", 1)[-1]
        for p in PROPERTIES:
            a, r = props[p.name], ref[p.name]
            if isinstance(a, Unread) or isinstance(r, Unread):
                continue
            if not same(p, a, r, dtype):
                out.append(Difference(run, p.name, r, a))
    return out


# ------------------------------------------------------------------ readings any adapter may use
GELU_PROBE = (-3.0, -1.5, -0.5, 0.5, 1.0, 2.0)  # where tanh and erf GELU differ by up to ~3e-4


def gelu_kind(outputs) -> str | Unread:
    """"tanh" or "none" from a GELU's outputs at GELU_PROBE (computed in float32 or wider)."""
    ys = [float(y) for y in outputs]
    tanh = [0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))) for x in GELU_PROBE]
    exact = [0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in GELU_PROBE]
    et = max(abs(y - t) for y, t in zip(ys, tanh))
    ee = max(abs(y - e) for y, e in zip(ys, exact))
    if min(et, ee) > 1e-5 or max(et, ee) < 4 * min(et, ee):
        return Unread(f"neither tanh nor erf GELU (max error {min(et, ee):.2g})")
    return "tanh" if et < ee else "none"


def rope_from_inv_freq(inv_freq) -> tuple[float, float]:
    """(base, linear scaling factor) from RoPE's inverse frequencies 1 / (factor * base^(2i/d)), i < d/2.

    The base comes from the first and last frequency (log-linear in i), so the float32 rounding of each
    enters once, not raised to the power d/2.
    """
    f = [float(x) for x in inv_freq]
    d = 2 * len(f)
    # proportional RoPE (Gemma 4's global layers) zero-pads the frequencies past its rotated share: the base
    # comes from the rotated ones, still over the whole head's d
    m = next((i for i, x in enumerate(f) if x <= 0), len(f))
    if m == 0:
        return float("nan"), float("nan")
    base = math.exp((math.log(f[0]) - math.log(f[m - 1])) * d / (2 * (m - 1))) if m > 1 else float("nan")
    return _nice(base), _nice(1.0 / f[0])


def _nice(x: float) -> float:
    """x rounded to 7 significant digits: the float32 it was read from holds no more."""
    return float(f"{x:.7g}") if math.isfinite(x) else x
