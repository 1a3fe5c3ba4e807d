"""Canonical tap names, in forward order, and the --layers / --taps selectors."""

from __future__ import annotations

import fnmatch
import re

import numpy as np

from parity.errors import ParityInputError
from parity.model.spec import GemmaSpec

LAYER_TAPS_PRE = ("attn_norm", "attn")
LAYER_TAPS_MLP = ("mlp_norm", "mlp.gate", "mlp.up", "mlp.act", "mlp.hidden", "mlp")


# Gemma 4 (docs/gemma4.md): the mixture of experts beside the dense MLP, in forward order
MOE_TAPS = ("dense_branch", "moe.router_logits", "moe.router_probs", "moe.experts", "moe.weights", "moe_branch")


def layer_tap_names(spec: GemmaSpec, i: int) -> list[str]:
    p = f"layers.{i}."
    names = [p + "per_layer_input"] if spec.ple_dim else []
    names += [p + "attn_norm", p + "attn"]
    if spec.norm_placement == "sandwich":
        names.append(p + "post_attn_norm")
    names += [p + "attn_residual"]
    names += [p + t for t in LAYER_TAPS_MLP]
    if spec.num_experts:
        names += [p + t for t in MOE_TAPS]
    if spec.norm_placement == "sandwich":
        names.append(p + "post_mlp_norm")
    if spec.ple_dim:
        names.append(p + "ple")
    if spec.layer_scalar:
        names.append(p + "pre_scalar")
    names.append(p + "out")
    return names


INTERNAL_TAPS = ("attn.scores", "attn.probs")  # attention internals, where an implementation exposes them
GLOBAL_INTERNAL_TAPS = ("rope.cos",)  # layer 0's rotary cos table
CACHE_TAPS = ("cache.k", "cache.v")  # decode only: what a layer's KV cache holds after a step


def decode_tap_order(spec: GemmaSpec) -> list[str]:
    """tap_order with each layer's cache taps before its attention internals (decode traces): the cache is
    written, then read by the scores, so a wrong cache entry is where a decode divergence starts."""
    out = []
    for t in tap_order(spec):
        i = layer_of(t)
        if i is not None and t == f"layers.{i}.{INTERNAL_TAPS[0]}":
            out += [f"layers.{i}.{x}" for x in CACHE_TAPS]
        out.append(t)
    return out


def tap_order(spec: GemmaSpec) -> list[str]:
    """Canonical taps with the optional attention internals in their forward position."""
    out = []
    for t in tap_names(spec):
        if t == "layers.0.attn_norm":
            out += list(GLOBAL_INTERNAL_TAPS)
        i = layer_of(t)
        if i is not None and t == f"layers.{i}.attn":
            out += [f"layers.{i}.{x}" for x in INTERNAL_TAPS]
        out.append(t)
    return out


def tap_names(spec: GemmaSpec, layers: list[int] | None = None) -> list[str]:
    """All canonical taps for the spec in forward order (optionally only some layers)."""
    chosen = range(spec.num_layers) if layers is None else layers
    names = ["embed"]
    for i in chosen:
        names += layer_tap_names(spec, i)
    return names + ["final_norm", "logits"]


def family_of(tap: str) -> str:
    """The tap with its layer index replaced by `*` (`layers.3.mlp.act` -> `layers.*.mlp.act`)."""
    i = layer_of(tap)
    return tap if i is None else tap.replace(f"layers.{i}.", "layers.*.", 1)


def layer_of(tap: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", tap)
    return int(m.group(1)) if m else None


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """`all`, or a comma list of indices and ranges like `0,2-3`."""
    if text is None or text.strip() == "all":
        return list(range(num_layers))
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise ParityInputError(f"{{option}} part {part!r} is not an index or range; use e.g. 'all' or '0,2-3'",
                                   option="layers")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        for i in (lo, hi):
            if not 0 <= i < num_layers:
                raise ParityInputError(
                    f"--layers names layer {i}, but the spec has {num_layers} layers (0..{num_layers - 1})"
                )
        if hi < lo:
            raise ParityInputError(f"{{option}} range {part!r} runs backwards; write it low-high", option="layers")
        out += range(lo, hi + 1)
    return sorted(set(out))


def select_taps(all_taps: list[str], patterns: str | None) -> list[str]:
    """--taps: comma-separated glob patterns over canonical tap names."""
    if not patterns:
        return all_taps
    chosen: list[str] = []
    for pat in (p.strip() for p in patterns.split(",")):
        hits = [t for t in all_taps if fnmatch.fnmatchcase(t, pat)]
        if not hits:
            raise ParityInputError(
                f"--taps pattern {pat!r} matches no tap; taps look like 'embed', 'layers.0.mlp.act', 'logits'"
            )
        chosen += [t for t in hits if t not in chosen]
    return [t for t in all_taps if t in chosen]


def expand_tap_map(template: dict[str, tuple[str, str]], spec: GemmaSpec) -> dict[str, tuple[str, str]]:
    """Expand a literal tap map with a `{}` layer placeholder to every tap the spec has.

    Taps of the spec that the template lacks are left out (the adapter says why).
    """
    out = {}
    for tap in tap_order(spec):
        i = layer_of(tap)
        key = tap if i is None else tap.replace(f"layers.{i}.", "layers.{}.", 1)
        if key in template:
            path, side = template[key]
            out[tap] = (path.format(i) if i is not None else path, side)
    return out


def order_experts(taps: dict, num_layers: int) -> dict:
    """In place: each layer's chosen experts (ids as float64) and their weights in descending order of weight per
    token, the contract's order (a runtime's top-k returns its own order), where both taps are present."""
    for i in range(num_layers):
        ids, w = taps.get(f"layers.{i}.moe.experts"), taps.get(f"layers.{i}.moe.weights")
        if ids is None or w is None:
            continue
        order = np.argsort(-np.asarray(w, np.float32), axis=-1, kind="stable")  # [T, k]
        taps[f"layers.{i}.moe.experts"] = np.take_along_axis(np.asarray(ids), order, -1).astype(np.float64)
        taps[f"layers.{i}.moe.weights"] = np.take_along_axis(np.asarray(w), order, -1)
    return taps
