"""Capture: build one implementation in one dtype, run every prompt, return traces.

The model is built once per (implementation, dtype) and released before the
next is built, so only one implementation is resident at a time.
"""

from __future__ import annotations

from typing import Callable

from parity.errors import ParityInputError
from parity.spec import GemmaSpec
from parity.taps import layer_of, tap_names, tap_order
from parity.trace import Trace
from parity.weights import Weights

Progress = Callable[[str], None]


def isolated_feed(spec: GemmaSpec, ref: Trace) -> dict:
    """For every sub-layer, the reference's value of the tap that feeds it.

    Feeding the input of the module that produces tap X with the reference's
    input to X makes X's error local: nothing computed upstream leaks in.
    """
    feed = {}
    for tap in tap_names(spec):
        i = layer_of(tap)
        if i is None:
            if tap == "final_norm":
                feed[tap] = ref.taps[f"layers.{spec.num_layers - 1}.out"]
            continue
        p = f"layers.{i}."
        prev = "embed" if i == 0 else f"layers.{i - 1}.out"
        source = {
            p + "attn_norm": prev,
            p + "attn": p + "attn_norm",
            p + "post_attn_norm": p + "attn",
            p + "mlp_norm": p + "attn_residual",
            p + "mlp": p + "mlp_norm",
            p + "post_mlp_norm": p + "mlp",
            p + "out": prev,
        }.get(tap)
        if source is not None and source in ref.taps:
            feed[tap] = ref.taps[source]
    return feed


def capture(
    adapter,
    spec: GemmaSpec,
    weights: Weights,
    dtype: str,
    prompts: dict[str, list[int]],
    mode: str = "cumulative",
    references: dict[str, Trace] | None = None,
    progress: Progress | None = None,
) -> list[Trace]:
    say = progress or (lambda _msg: None)
    adapter.check(spec, dtype)
    say(f"{adapter.name} {dtype}: building")
    model = adapter.build(spec, weights, dtype)
    try:
        effective = adapter.effective(model)
        traces = []
        for name, ids in prompts.items():
            say(f"{adapter.name} {dtype} {mode}: running prompt {name!r} ({len(ids)} tokens)")
            feed = None
            if mode == "isolated":
                if not references or name not in references:
                    raise ParityInputError("isolated mode needs the reference trace of each prompt first")
                feed = isolated_feed(spec, references[name])
            result = adapter.run(model, ids, feed=feed)
            unavailable = dict(getattr(adapter, "cannot", {}) or {})
            unavailable.update(result.unavailable)
            order = [t for t in tap_order(spec) if t in result.taps]
            extra = [t for t in result.taps if t not in order]  # attention internals etc.
            traces.append(Trace(
                impl=adapter.name, version=adapter.version(), dtype=dtype, spec=spec.to_dict(),
                weights_hash=weights.hash, tokens=list(ids), prompt=name, mode=mode,
                taps={t: result.taps[t] for t in order + extra}, unavailable=unavailable,
                effective=effective,
            ))
        return traces
    finally:
        adapter.release(model)
        del model
