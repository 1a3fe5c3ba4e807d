"""The honest reference of a quantized run: the float64 port on the weights the runtime holds.

A runtime that quantizes its weights (llama.cpp's q4_0, onnxruntime's MatMulNBits) computes a different model
from the one it was given; against the given weights' reference every tap of it would fail by the quantization
alone, and a wrong kernel would hide under that. Its adapter says what it holds (parity.adapters.base.Held:
the weights dequantized from its own file, and how its matmuls round activations). This module computes, once
per distinct held weight set:

* the reference: the float64 port on the held weights (prefill, and the full forwards decode runs need);
* the honest-noise model: the ensemble's members in the run's dtype on the held weights, each rounding every
  projection's input as the runtime's kernels do (PortOptions.act_quant), so honest activation quantization
  is noise, and anything beyond it a divergence at the strictness of an unquantized run.

The run is then compared with these exactly as an unquantized run is with the ordinary reference; the loss
against the ordinary reference is parity.compare.quant's, reported apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from parity.compare.noise import NoiseModel, factory_spec, measure, members
from parity.model.weights import Weights


@dataclass
class HeldReference:
    weights: Weights  # the held weights (dequantized from the runtime's file)
    weight_type: str
    activations: str | None
    kv: str | None = None  # how its KV cache rounds attention's operands (Held.kv)
    refs: dict = field(default_factory=dict)  # prompt -> the float64 port's cumulative trace on `weights`
    full: dict = field(default_factory=dict)  # prompt -> its full forward (decode's ground truth)
    noise: NoiseModel | None = None
    runs: list = field(default_factory=list)  # "impl@dtype" judged against it

    @property
    def what(self) -> str:
        act = f", activations rounded {self.activations} in its matmuls" if self.activations else ""
        act += f", attention through a {self.kv} KV cache" if self.kv else ""
        return f"the reference on its own dequantized {self.weight_type} weights{act}"


def held_reference(held, take, ref, ref_modes: list[str], dtypes: list[str], run_modes: list[str], count: int,
                   table, separate: bool, replay, full_mode: str, ref_dtype: str, given: str,
                   spec: dict | None = None, known: tuple[dict, dict] | None = None) -> HeldReference:
    """`take(name, adapter, dtype, modes, refs, checked, weights)`: the harness's capture (in process or not);
    `ref`: (name, adapter) of the reference; `given`: the hash of the weights the run was given, which these
    traces are labelled with (pairing refuses traces of other weights: these are of the run's weights as the
    run holds them, which is the point); `known`: (cumulative, full) reference traces already captured on these
    very weights (a run that holds the given weights and only rounds otherwise), used instead of a second capture."""
    out = HeldReference(held.weights, held.weight_type, held.activations, kv=getattr(held, "kv", None))

    # its trace files apart from the ordinary reference's and every other held set's (same impl, dtype and mode)
    sub = f"held-{held.weights.hash[:16]}-{held.activations or 'none'}-{out.kv or 'none'}".replace("/", "_")

    def take_held(*args):
        # labelled with the run's weights and spec (a held head the runtime quantized apart unties the model it
        # holds; the run's traces carry the spec it was given)
        got = take(*args, held.weights, sub)
        return [dataclasses.replace(t, weights_hash=given, spec=spec or t.spec) for t in got]

    if known is not None:
        out.refs, out.full = dict(known[0]), dict(known[1])
    else:
        got = take_held(ref[0], ref[1], ref_dtype, ref_modes, None, True)
        out.refs = {t.prompt: t for t in got if t.mode == "cumulative"}
        out.full = {t.prompt: t for t in got if t.mode == full_mode}
    honest = []
    for d in dict.fromkeys(dtypes) if count else ():
        if d == ref_dtype:
            continue
        for m in members(count):
            m = m.rounding_activations(held.activations, out.kv)
            honest += take_held(factory_spec(m) if separate else m.impl, None if separate else m.adapter(), d,
                                run_modes, out.refs, False)
    out.noise = measure(out.refs, honest, table, out.full, replay) if honest else None
    return out
