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
    weights: Weights | None  # the held weights (dequantized from the runtime's file); None: judged from saved traces
    weight_type: str
    activations: str | None
    kv: str | None = None  # how its KV cache rounds attention's operands (Held.kv)
    refs: dict = field(default_factory=dict)  # prompt -> the float64 port's cumulative trace on `weights`
    full: dict = field(default_factory=dict)  # prompt -> its full forward (decode's ground truth)
    noise: NoiseModel | None = None
    runs: list = field(default_factory=list)  # "impl@dtype" judged against it
    # the held weights' hash, computed once (hashing dequantizes every tensor of a runtime's file again); from
    # their saved traces where only those are at hand (weights None)
    held_hash: str = ""

    @property
    def folder(self) -> str:
        """Its trace files' subfolder of the trace folder: apart from the ordinary reference's and every other held
        set's (they are the same impl, dtype and mode)."""
        return f"held-{self.weights_hash[:16]}-{self.activations or 'none'}-{self.kv or 'none'}".replace("/", "_")

    @property
    def weights_hash(self) -> str:
        return self.held_hash or self.weights.hash

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
    out = HeldReference(held.weights, held.weight_type, held.activations, kv=getattr(held, "kv", None),
                        held_hash=held.weights.hash)
    sub = out.folder

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


# What a saved held reference carries (Trace.held) so that judging saved traces (harness.from_traces) gives the live
# verdict and quant section: the held set's identity and rounding, the runs judged against it, their honest-noise
# statistics for this prompt (the members' traces are not saved), and each run's quantization-loss budget.
def saved(h: HeldReference, budgets: dict[str, float | None]) -> list:
    """The held reference's traces (cumulative and full forwards), each a copy carrying its Trace.held metadata;
    `budgets`: "impl@dtype" -> the budget its quantization loss was checked against (a run held on the given weights
    and only rounding otherwise has none: no quantization loss)."""
    out = []
    for mode_traces in (h.refs, h.full):
        for prompt, t in mode_traces.items():
            meta = {"folder": h.folder, "weights_hash": h.weights_hash, "weight_type": h.weight_type,
                    "activations": h.activations, "kv": h.kv, "runs": list(h.runs),
                    "budgets": {r: budgets[r] for r in h.runs if r in budgets}}
            if t.mode == "cumulative":  # the noise once per prompt, on its cumulative trace
                meta["noise"] = None if h.noise is None else {
                    "members": list(h.noise.members),
                    "stats": [[d, m, tap, v, who] for (d, m, p, tap), (v, who) in h.noise.stats.items() if p == prompt]}
            out.append(dataclasses.replace(t, held=meta))
    return out


def from_saved(traces: list, full_mode: str) -> tuple[dict, dict]:
    """The held references of saved traces (those carrying Trace.held), as `saved` wrote them: ("impl@dtype" ->
    HeldReference without weights, "impl@dtype" -> quantization-loss budget)."""
    groups: dict[str, HeldReference] = {}
    budgets: dict[str, float | None] = {}
    for t in traces:
        meta = t.held
        h = groups.get(meta["folder"])
        if h is None:
            h = groups[meta["folder"]] = HeldReference(None, meta["weight_type"], meta["activations"], kv=meta["kv"],
                                                       runs=list(meta["runs"]), held_hash=meta["weights_hash"])
        budgets.update(meta.get("budgets", {}))
        if t.mode == full_mode:
            h.full[t.prompt] = t
            continue
        h.refs[t.prompt] = t
        noise = meta.get("noise")
        if noise is not None:
            h.noise = h.noise or NoiseModel(members=tuple(noise["members"]))
            h.noise.stats.update({(d, m, t.prompt, tap): (v, who) for d, m, tap, v, who in noise["stats"]})
    return {label: h for h in groups.values() for label in h.runs}, budgets
