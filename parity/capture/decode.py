"""The decode path laid out for comparison: one row per decode step, at fixed positions.

A decode trace (mode `decode`) holds, for each canonical tap, the rows an
implementation computed one step at a time through its own KV cache, stacked
[S, ...] (step s is the continuation's token s at position p = P + s, P the
prompt's length). Its ground truth is a full forward over prompt +
continuation with no cache (mode `decode-full`), at the same positions:
causality makes row p of that one forward the forward over tokens[:p+1]. The
same implementation's own `decode-full` trace is what its cache must
reproduce (cache consistency, which needs no reference at all).

Layouts, so the two sides compare element for element:
* ordinary taps: [S, ...], the new position's row;
* `layers.{i}.attn.scores` / `.probs`: [S, n, P + S] over absolute key
  positions (a key the step did not attend to: -inf / 0), whatever slot order
  the library's cache keeps;
* `layers.{i}.cache.k` / `.v`: [S, kv, V, hd] where V is the widest set of
  positions any step must see (global layer: 0..p; local: the last `window`),
  entry j the j-th such position in ascending order, zero beyond the step's
  own set; a position the cache lacks is NaN there (a stale or missing slot
  shows as a failing element), an entry it keeps beyond them is ignored.

Framework-free: adapters return numpy (parity.adapters.base.DecodeStep).
"""

from __future__ import annotations

import numpy as np

from parity.errors import ImplementationError, ParityInputError
from parity.model.spec import GemmaSpec
from parity.model.taps import CACHE_TAPS, layer_of

DECODE, FULL, SELF = "decode", "decode-full", "decode-self"
DEFAULT_STEPS = 8  # past no window (Gemma 1): a few steps show a position or cache bug
CONTINUATION_SEED = 4321
INTERNAL = ("attn.scores", "attn.probs")


def parse_steps(text: str) -> int | str:
    """The decode option's value as the command line and the plugin take it: `N` (>= 0) or `auto`."""
    text = text.strip()
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise ParityInputError(f"{{option}} {text!r} is not a step count; give N >= 0 or 'auto'", option="decode")
    return n


def auto_steps(spec: GemmaSpec) -> int:
    """Twice the longest sliding window plus two: every ring buffer wraps at least once past any prompt."""
    windows = [spec.window_for(i) for i in range(spec.num_layers)]
    longest = max((w for w in windows if w), default=None)
    return DEFAULT_STEPS if longest is None else 2 * longest + 2


def continuation(spec: GemmaSpec, steps: int, seed: int = CONTINUATION_SEED) -> list[int]:
    """Seeded ordinary token ids (no pad, eos or bos), the same for every implementation."""
    from parity.model.prompts import FIRST_ORDINARY_ID

    rng = np.random.default_rng(seed)
    lo = FIRST_ORDINARY_ID if spec.vocab_size > FIRST_ORDINARY_ID + 1 else 0
    return rng.integers(lo, spec.vocab_size, steps).tolist()


def check_lengths(spec: GemmaSpec, prompts: dict[str, list[int]], cont: list[int]) -> None:
    if not cont:
        raise ParityInputError("{option} gives no continuation tokens; give N >= 1 steps", option="decode")
    for name, ids in prompts.items():
        if len(ids) + len(cont) > spec.max_position:
            raise ParityInputError(
                f"{{option}}: prompt {name!r} ({len(ids)} tokens) + {len(cont)} decode steps = "
                f"{len(ids) + len(cont)} positions, beyond the spec's max_position {spec.max_position}; decode "
                "fewer steps", option="decode")


def visible(spec: GemmaSpec, layer: int, p: int) -> np.ndarray:
    """The positions a query at p must see in `layer` ([V] ascending)."""
    w = spec.window_for(layer)
    lo = 0 if w is None else max(0, p - w + 1)
    return np.arange(lo, p + 1)


def widest(spec: GemmaSpec, layer: int, P: int, S: int) -> int:
    return max(len(visible(spec, layer, P + s)) for s in range(S))


def full_rows(taps, spec: GemmaSpec, P: int, S: int) -> dict[str, np.ndarray]:
    """A full forward's taps (over P + S tokens) at the continuation's positions, in the decode layout.

    Cache taps come from a full forward's `layers.{i}.cache.k` / `.v` ([T, kv, hd], the keys and values
    each position writes), where the implementation gives them (the port does; see `rows_of_cache`).
    """
    out = {}
    for tap in taps:
        a = np.asarray(taps[tap])
        i = layer_of(tap)
        if i is not None and tap.endswith(tuple("." + c for c in CACHE_TAPS)):
            out[tap] = _cache_from_full(a, spec, i, P, S)
        elif i is not None and tap.endswith(tuple("." + x for x in INTERNAL)):
            out[tap] = np.ascontiguousarray(a[:, P:P + S, :].transpose(1, 0, 2))  # [n, T, T] -> [S, n, T]
        elif tap == "rope.cos" or a.ndim >= 1 and a.shape[0] == P + S:
            out[tap] = a[P:P + S]
        else:
            out[tap] = a
    return out


def _cache_from_full(a: np.ndarray, spec: GemmaSpec, layer: int, P: int, S: int) -> np.ndarray:
    """[T, kv, hd] -> [S, kv, V, hd]: at each step the positions it must see, ascending, zero-padded."""
    T, kv, hd = a.shape
    V = widest(spec, layer, P, S)
    out = np.zeros((S, kv, V, hd), a.dtype)
    for s in range(S):
        pos = visible(spec, layer, P + s)
        out[s, :, :len(pos)] = a[pos].transpose(1, 0, 2)  # [V_s, kv, hd] -> [kv, V_s, hd]
    return out


def decode_rows(result, spec: GemmaSpec, P: int, S: int, impl: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """An adapter's DecodeResult in the decode layout, and the taps it declared or could not lay out."""
    steps = list(getattr(result, "steps", []) or [])
    if len(steps) != S:
        raise ImplementationError(impl, "decode()", f"returned {len(steps)} steps for {S} continuation tokens",
                                  "return one DecodeStep per continuation token")
    unavailable = dict(getattr(result, "unavailable", {}) or {})
    T = P + S
    out: dict[str, np.ndarray] = {}
    names = list(dict.fromkeys(t for st in steps for t in st.taps))
    for tap in names:
        if tap in unavailable:
            continue
        rows = []
        i = layer_of(tap)
        for s, st in enumerate(steps):
            if tap not in st.taps:
                raise ImplementationError(impl, "decode()", f"step {s} lacks tap {tap!r} that other steps return",
                                          "return the same taps at every step")
            v = np.asarray(st.taps[tap])
            if i is not None and tap.endswith(tuple("." + x for x in INTERNAL)):
                keys = st.key_positions.get(i) if st.key_positions else None
                placed = _place_keys(v, keys, P + s, T, fill=-np.inf if tap.endswith("scores") else 0.0)
                if placed is None:
                    unavailable[tap] = (f"attends over {v.shape[-1]} keys at step {s} (position {P + s}) without "
                                        "their positions (DecodeStep.key_positions)")
                    break
                rows.append(placed)
            else:
                if v.ndim == 0 or v.shape[0] != 1:
                    raise ImplementationError(impl, "decode()", f"step {s} tap {tap!r} has shape {v.shape}; a "
                                              "decode step's tap is [1, ...] (the new position)",
                                              "return the new position's row only")
                rows.append(v[0])
        else:
            out[tap] = np.stack(rows)
    have_cache = any(st.cache for st in steps)
    for i in range(spec.num_layers):
        for part in CACHE_TAPS:
            tap = f"layers.{i}.{part}"
            if tap in unavailable:
                continue
            if not have_cache or any(i not in st.cache for st in steps):
                unavailable.setdefault(tap, "its cache is not exposed while decoding")
                continue
            out[tap] = _cache_rows([st.cache[i] for st in steps], part, spec, i, P, S)
    return out, unavailable


def _place_keys(v: np.ndarray, keys, p: int, T: int, fill: float) -> np.ndarray | None:
    """[n, 1, L] over keys at `keys` -> [n, T] over absolute positions; None if the positions are unknown."""
    v = v.reshape(v.shape[0], -1)  # [n, 1, L] -> [n, L]
    L = v.shape[1]
    if keys is None:
        if L != p + 1:
            return None
        keys = np.arange(L)
    keys = np.asarray(keys, np.int64)
    out = np.full((v.shape[0], T), fill, np.float64 if v.dtype == np.float64 else np.float32)
    ok = (keys >= 0) & (keys < T)
    out[:, keys[ok]] = v[:, ok]
    return out


def _cache_rows(views, part: str, spec: GemmaSpec, layer: int, P: int, S: int) -> np.ndarray:
    """Each step's CacheView at the positions the step must see ([S, kv, V, hd]); a missing one is NaN."""
    first = np.asarray(getattr(views[0], part[-1]))
    kv, hd = first.shape[0], first.shape[-1]
    V = widest(spec, layer, P, S)
    out = np.zeros((S, kv, V, hd), np.float64 if first.dtype == np.float64 else np.float32)
    for s, view in enumerate(views):
        pos = np.asarray(view.positions, np.int64).reshape(-1)
        data = np.asarray(getattr(view, part[-1]))  # [kv, L, hd]
        where = {int(q): j for j, q in enumerate(pos)}  # the last entry holding a position wins
        for j, q in enumerate(visible(spec, layer, P + s)):
            out[s, :, j] = data[:, where[int(q)]] if int(q) in where else np.nan
    return out
