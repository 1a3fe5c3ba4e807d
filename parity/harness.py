"""The straight line: spec + weights -> adapters -> traces -> compare -> diagnose -> Report.

Everything the CLI, the pytest suite and users' own tests need, with no
argument parsing and no printing (progress goes through a callback).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass, field

from parity.adapters.declared import declared
from parity.capture.cache import TraceCache, spec_key, tokens_key, using
from parity.capture.runner import Progress, capture, capture_in_subprocess, produced
from parity.compare.pairs import TapResult, compare_all, pair_traces
from parity.compare.routing import account as account_routing, replayer
from parity.capture.decode import DECODE, FULL, SELF, auto_steps, check_lengths, continuation
from parity.errors import ImplementationError, ParityInputError
from parity.capture.implementations import (  # noqa: F401 -- resolving and checking implementations lives there
    Elsewhere, checked_impls, resolve_elsewhere, resolve_impls,
)
from parity.compare.noise import LARGE_MEMBERS, SMALL_MEMBERS, NoiseModel, factory_spec, measure, members
from parity.model.prompts import default_prompts, validate_tokens
from parity.model.spec import GemmaSpec, truncate  # noqa: F401 -- truncate: the old import path
from parity.numerics.tolerances import TOLERANCES, Tolerance
from parity.capture.trace import Trace
from parity.model.weights import param_count, random_weights, Weights
from parity.adapters.torch_setup import stream_layers, threads
from parity.diagnose.run import diagnose
from parity.gate.verdict import check_compared, decide
from parity.capture.runs import Run
from parity.diagnose.finding import Finding, RunProbe

MODES = ("cumulative", "isolated", "both")
PORT = "litgpt-style"  # the project's port: the reference, and the honest ensemble's first member
REFERENCE = (PORT, "float64")
LARGE_BYTES = 1 << 30  # float32 weights beyond this: stored weights, one process per implementation
REDUCE_OVER = 1 << 24  # 16M elements: a Gemma logits tap of 128 tokens (32M) is stored reduced


def is_large(spec: GemmaSpec) -> bool:
    import os


    text = os.environ.get("PARITY_LARGE_OVER", str(LARGE_BYTES))
    try:
        over = int(text)
    except ValueError:
        raise ParityInputError(f"PARITY_LARGE_OVER={text!r} is not a byte count; give an integer, "
                               f"e.g. {LARGE_BYTES}") from None
    return param_count(spec) * 4 > over


@dataclass
class Request:
    spec: GemmaSpec
    impls: list[str] | None = None  # None: every installed built-in
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    layers: list[int] | None = None  # None: all
    prompts: dict[str, list[int]] | None = None  # None: the default short and long prompt
    seed: int = 0
    mode: str = "cumulative"
    weights: Weights | None = None
    tolerances: dict[str, Tolerance] | None = None
    reference: tuple[str, str] = REFERENCE
    adapters: dict | None = None  # name -> adapter instance, overriding the registry (tests, plug-ins)
    first_layers: int | None = None  # run only the spec's first N layers (final norm and head on top)
    separate_processes: bool | None = None  # one process per implementation and dtype; None: at real sizes
    trace_dir: str | None = None  # where traces go; None: a temporary directory (separate processes only)
    reduce_over: int | None = REDUCE_OVER  # taps of more elements are stored reduced (separate processes)
    full_taps: str | None = None  # glob patterns of taps never reduced
    weights_profile: str = "default"  # statistics of the seeded random weights (parity.model.weights.PROFILES)
    raw_logits: bool = False  # compare logits as they are, not up to a constant per position
    noise_members: int | None = None  # honest-ensemble size (parity.compare.noise); None: 4, 2 at real sizes; 0: table only
    decode: int | str = 0  # decode steps after each prompt through each implementation's cache; "auto": past the window
    decode_tokens: list[int] | None = None  # the continuation decoded (teacher-forced); None: seeded ids
    allow_large: bool = False  # skip the up-front memory and disk estimate (parity.model.resources)
    # shares the reference's traces, the honest-noise model and the counterfactual captures with other runs of the
    # same spec, weights, prompts and dtypes (parity.capture.cache); None: everything computed afresh
    cache: TraceCache | None = None
    # quantized runs (parity.compare.quant): the mean-KL budget of the quantization loss, one number for every
    # weight type or {weight type: nats}; None: the documented default per weight type
    quant_budget: float | dict[str, float] | None = None
    # run-wide runtime settings (`--kv-cache` -> kv_type, `--flash-attn` -> flash_attn), given to the built-ins
    # that declare them settable (parity.adapters.registry.Builtin.settable); shown with each run
    runtime: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    spec: GemmaSpec
    weights_hash: str
    weights_source: str
    reference: str
    prompts: dict[str, list[int]]
    runs: list[Run]
    results: list[TapResult]
    traces: list[Trace]
    skipped: dict[str, str]
    effective: dict[str, dict]
    diagnosis: list[Finding] = field(default_factory=list)
    probes: list[RunProbe] = field(default_factory=list)
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    weights: Weights | None = None
    noise: NoiseModel | None = None  # the honest-noise model; None: the fixed table alone decided
    continuation: list[int] = field(default_factory=list)  # the tokens decoded after each prompt (empty: none)
    routing: list = field(default_factory=list)  # parity.compare.routing.RoutingResult per (run, prompt, MoE layer)
    # quantized runs: "impl@dtype" -> the reference they are judged against (the port on the weights they hold,
    # parity.compare.held), and each one's quantization loss against the given weights (parity.compare.quant)
    held: dict = field(default_factory=dict)
    quant: list = field(default_factory=list)

    def weights_for(self, impl: str, dtype: str) -> Weights | None:
        """The weights a run computes with: its held (dequantized) weights, or the report's."""
        h = self.held.get(f"{impl}@{dtype}")
        return h.weights if h is not None else self.weights

    def noise_for(self, impl: str, dtype: str) -> NoiseModel | None:
        h = self.held.get(f"{impl}@{dtype}")
        return h.noise if h is not None else self.noise

    def reference_trace(self, impl: str, dtype: str, prompt: str, mode: str = "cumulative") -> Trace | None:
        """The reference trace a run of impl@dtype is compared with (mode cumulative, or FULL for decode)."""
        h = self.held.get(f"{impl}@{dtype}")
        if h is not None:
            return (h.full if mode == FULL else h.refs).get(prompt)
        name, rdtype = self.reference.rsplit("@", 1)
        return next((t for t in self.traces if (t.impl, t.dtype, t.prompt, t.mode) == (name, rdtype, prompt, mode)),
                    None)

    @property
    def divergent_causes(self) -> list[Finding]:
        return [d for d in self.diagnosis if d.severity == "divergence"]

    @property
    def effective_differences(self) -> list:
        """Each run's effective properties whose values differ from the reference's, typed
        (parity.model.effective.Difference: run, property, reference value, this value)."""
        from parity.model.effective import differences

        return differences(self.effective or {}, self.reference)

    @property
    def verdict(self):
        """The one verdict (parity.gate.verdict.decide), computed from the current results and diagnosis."""
        return decide(self)

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def run_results(self, impl: str, dtype: str, mode: str) -> list[TapResult]:
        return [r for r in self.results if (r.impl, r.dtype, r.mode) == (impl, dtype, mode)]

    def first_divergences(self) -> list[TapResult]:
        """Each failing run's first divergence, as the one verdict finds it."""
        return [rv.first for rv in self.verdict.runs if rv.first is not None]

    def trace(self, impl: str, dtype: str, prompt: str, mode: str = "cumulative") -> Trace:
        for t in self.traces:
            if (t.impl, t.dtype, t.prompt, t.mode) == (impl, dtype, prompt, mode):
                return t
        raise KeyError(f"no trace for {impl}@{dtype} {mode} prompt {prompt!r}")


def check_request(req: Request) -> None:
    """The request's own fields, checked before any work (bad input: one line, exit 2)."""
    from parity.adapters.base import DTYPES

    if req.mode not in MODES:
        raise ParityInputError(f"{{option}} {req.mode!r} is not a mode; use one of {MODES}", option="mode")
    if req.reduce_over is not None and req.reduce_over < 0:
        raise ParityInputError(f"{{option}} {req.reduce_over} is negative; give an element count >= 0 "
                               "(0 reduces every tap)", option="reduce_over")
    for d in req.dtypes:
        if d not in DTYPES:
            raise ParityInputError(f"unknown dtype {d!r}; use one of {', '.join(DTYPES)}")
    if not req.dtypes:
        raise ParityInputError("no dtypes given; use e.g. --dtypes float32,bfloat16")
    if req.reference[1] not in DTYPES:
        raise ParityInputError(f"{{option}} {req.reference[0]}@{req.reference[1]}: {req.reference[1]!r} is not a "
                               f"dtype; use one of {', '.join(DTYPES)} (e.g. litgpt-style@float64)", option="reference")
    if req.seed < 0:
        raise ParityInputError(f"{{option}} {req.seed} is negative; give a seed >= 0", option="seed")
    if req.noise_members is not None and req.noise_members < 0:
        raise ParityInputError(f"noise_members {req.noise_members} is negative; give 0 (table only) or more members")
    check_runtime(req)
    check_versions(req)
    check_resources(req)


RUNTIME_SETTINGS = {"kv_type": ("kv-cache", ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0")),
                    "flash_attn": ("flash-attn", ("on", "off"))}


def check_runtime(req: Request) -> None:
    """Each runtime setting known, valid, and taken by at least one chosen built-in (else it would be ignored)."""
    from parity.adapters import default_impls
    from parity.adapters.registry import BUILTINS

    names = req.impls if req.impls is not None else default_impls()
    adapters = req.adapters or {}
    if req.quant_budget is not None and not any(n in adapters or n not in BUILTINS or BUILTINS[n].holds
                                                for n in names):
        # built-ins say whether they quantize; a plug-in may (Adapter.held), so only an all-built-in choice is refused
        raise ParityInputError("{option} was given, but none of the implementations run quantizes its weights; drop "
                               "it, or add a quantized run such as llama-cpp-q4_0 or ort-genai-int4",
                               option="quant_budget")
    for key, value in (req.runtime or {}).items():
        if key not in RUNTIME_SETTINGS:
            raise ParityInputError(f"runtime setting {key!r} is not known; use one of {', '.join(RUNTIME_SETTINGS)}")
        flag, allowed = RUNTIME_SETTINGS[key]
        if value not in allowed:
            raise ParityInputError(f"--{flag} {value!r} is not one of {', '.join(allowed)}")
        takers = [n for n in names if n in BUILTINS and key in BUILTINS[n].settable]
        if not takers:
            can = sorted(n for n, b in BUILTINS.items() if key in b.settable)
            raise ParityInputError(f"--{flag} {value} applies to {', '.join(can) or 'no built-in'} only, and none "
                                   f"of them is among the implementations run; add one (e.g. --impls "
                                   f"{can[0] if can else '?'}) or drop --{flag}")


def check_versions(req: Request) -> None:
    """Each named built-in's installed library versions (metadata only, nothing imported), before any weight is
    made: one outside its declared range, for the run or for --decode, is refused in one line (exit 2)."""
    from parity.adapters import default_impls
    from parity.adapters.registry import require

    decoding = req.decode_tokens is not None or req.decode not in (0, None)
    for name in dict.fromkeys([*(req.impls if req.impls is not None else default_impls()), req.reference[0]]):
        if req.impls is not None or name == req.reference[0]:
            require(name)  # a default one out of range is skipped later with the same line
        if decoding:
            require(name, "decode")


def check_resources(req: Request) -> None:
    """The memory and disk the run needs, estimated from the spec and refused before any weight is made."""
    from pathlib import Path

    from parity.model import resources
    from parity.model.weight_store import cache_dir, spec_digest

    threads()  # PARITY_THREADS bounds, also before any work
    stream_layers(0)  # PARITY_STREAM's value too, not when the first model is built
    spec = req.spec if req.first_layers is None else truncate(req.spec, req.first_layers)
    large = is_large(req.spec)
    cache = None
    if req.weights is None and large:
        suffix = "" if req.weights_profile == "default" else f"-{req.weights_profile}"
        cache = cache_dir() / "weights" / f"{spec_digest(spec)}-seed{req.seed}{suffix}.safetensors"
        cache = None if cache.is_file() else cache
    tokens = max((len(p) for p in (req.prompts or default_prompts(spec)).values() if isinstance(p, list)), default=1)
    if isinstance(req.decode, int) and not isinstance(req.decode, bool) and req.decode > 0:
        tokens += req.decode
    in_memory = req.weights is None and not large
    est = resources.estimate(spec, [*req.dtypes, req.reference[1]], tokens, in_memory, cache and Path(cache))
    resources.check(est, req.allow_large)


def weights_for(req: Request, large: bool, progress: Progress | None = None) -> tuple[GemmaSpec, Weights]:
    """The spec as run (truncated to --first-layers) and its checked weights: given, stored or in memory."""
    spec = req.spec
    if req.weights is not None:
        weights = req.weights
        if weights.spec != spec:
            raise ParityInputError("the weights were made for a different spec; pass the spec they came with")
        weights.check()
        if req.first_layers is not None:
            spec = truncate(spec, req.first_layers)
            weights = weights.truncated(spec)
        return spec, weights
    if req.first_layers is not None:
        # random weights are seeded per tensor by name: the shallow spec's are the deep one's first
        # layers, so only those are generated (a Gemma-2-27B shape's 54 GB never are)
        spec = truncate(spec, req.first_layers)
    if large:
        from parity.model.weight_store import stored_random_weights

        weights = stored_random_weights(spec, req.seed, progress, req.weights_profile)
    else:
        weights = random_weights(spec, req.seed, req.weights_profile)
    weights.check()
    return spec, weights


def run(req: Request, progress: Progress | None = None) -> Report:
    check_request(req)
    threads()
    large = is_large(req.spec)
    spec, weights = weights_for(req, large, progress)
    prompts = {k: validate_tokens(k, v, spec) for k, v in (req.prompts or default_prompts(spec)).items()}
    cont = decode_plan(req, spec, prompts)
    table = req.tolerances or TOLERANCES
    separate = large if req.separate_processes is None else req.separate_processes
    ref_name, ref_dtype = req.reference
    if separate and not req.adapters:
        # the frameworks are imported only by the processes that run them: this one stays small (about
        # 1 GB less with tensorflow, JAX and torch), which counts when a child holds 10 GB of weights
        impls, skipped, ref_adapter = resolve_elsewhere(req, spec)
    else:
        impls, skipped, ref_adapter = checked_impls(req, spec)
    modes = ["cumulative", "isolated"] if req.mode == "both" else [req.mode]
    if cont:
        modes.append(DECODE)

    def modes_for(adapter, dtype):
        """The reference against itself says nothing in cumulative mode; its own cache it still checks."""
        ms = [m for m in modes if not ((adapter.name, dtype) == (ref_name, ref_dtype) and m == "cumulative")]
        return [m for m in ms if m != DECODE or declared(adapter).decodes]

    for _, a in impls:
        if cont and not declared(a).decodes:
            skipped[f"{a.name} (decode)"] = "its adapter does not decode (Adapter.decodes is False): prefill only"
    planned = [(a.name, d) for _, a in impls for d in req.dtypes if modes_for(a, d)]
    if not planned:
        raise ParityInputError(f"nothing to compare: every run is the reference {ref_name}@{ref_dtype} itself; "
                               "add an implementation or a dtype (e.g. --dtypes float32,bfloat16)")
    names = [a.name for _, a in impls]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ParityInputError(f"two implementations are both named {dup[0]!r} (their rows would pool); give each "
                               "adapter its own name")
    trace_dir = req.trace_dir
    if separate and trace_dir is None:
        import shutil
        import tempfile

        trace_dir = tempfile.mkdtemp(prefix="parity-traces-")
    stored = dict(out_dir=trace_dir, reduce_over=req.reduce_over, full_taps=req.full_taps) if separate else {}

    def take(name, adapter, dtype, mode, refs=None, checked=True, w=None, sub=None):
        """`checked`: checked above with the others (a noise member is not: capture checks it); `w`: other
        weights than the run's (a quantized run's held weights, for its reference and honest members), whose
        trace files go in their own subfolder `sub` of the trace folder (the reference on held weights is the
        same implementation, dtype and mode as the ordinary one: one folder would overwrite the other's files)."""
        w = weights if w is None else w
        s = w.spec  # the run's spec, or a held model's (untied where the runtime quantized its head apart)
        if separate or declared(adapter).own_process:
            here = dict(stored, out_dir=str(Path(stored["out_dir"]) / sub)) if sub and stored.get("out_dir") \
                else stored
            return capture_in_subprocess(name, s, w, dtype, prompts, mode=mode, references=refs,
                                         progress=progress, continuation=cont, settings=req.runtime, **here)
        return capture(adapter, s, w, dtype, prompts, mode=mode, references=refs, progress=progress,
                       continuation=cont, checked=checked)

    # what the reference, the honest ensemble and the noise model depend on; None: not shared (no cache, or a
    # reference replaced by req.adapters or captured in its own process, whose traces are files)
    base = None
    if req.cache is not None and not separate and not declared(ref_adapter).own_process \
            and not (req.adapters and ref_name in req.adapters):
        base = (spec_key(spec), weights.hash, req.weights_profile, tokens_key(prompts), tuple(cont), ref_name,
                ref_dtype)
    ref_modes = ["cumulative"] + ([FULL] if cont else [])
    make_ref = lambda: take(ref_name, ref_adapter, ref_dtype, ref_modes)  # noqa: E731
    got = req.cache.traces(("reference", *base, tuple(ref_modes)), make_ref) if base else make_ref()
    ref_traces = {t.prompt: t for t in got if t.mode == "cumulative"}
    ref_full = {t.prompt: t for t in got if t.mode == FULL}  # the decode's ground truth: a full forward, no cache
    traces = list(got)
    n_ref = len(traces)
    effective = {f"{ref_name}@{ref_dtype}": ref_traces[next(iter(prompts))].effective}
    count = req.noise_members if req.noise_members is not None else (LARGE_MEMBERS if large else SMALL_MEMBERS)
    replay = replayer(ref_adapter, spec, weights)  # MoE: the reference re-run with a run's honest routing
    held = held_references(req, impls, modes_for, spec, weights, take, (ref_name, ref_adapter), ref_modes, modes,
                           count, table, separate, (ref_traces, ref_full))
    runs = []
    for name, adapter in impls:
        for d in req.dtypes:
            ms = modes_for(adapter, d)
            if not ms:
                continue  # the reference against itself says nothing
            h = held.get(f"{adapter.name}@{d}")
            got = take(name, adapter, d, ms, h.refs if h else ref_traces)  # one build for every mode
            traces += got
            effective.setdefault(f"{adapter.name}@{d}", got[0].effective if got else {})
            settings = dict(declared(adapter).settings)
            if h is not None:
                settings.update(weights=h.weight_type, activations=h.activations or "as computed")
                if h.kv:
                    settings["kv_rounding"] = h.kv
            for mode in ms:
                for m in ([DECODE, SELF] if mode == DECODE else [mode]):
                    runs.append(Run(adapter.name, adapter.version(), d, m, dict(got[0].resources) if got else {},
                                    settings))
    # the built-in port's own runs are the first member's, unless a test or plug-in replaced the port's adapter
    pure_port = any(name == PORT and not (req.adapters and PORT in req.adapters) for name, _ in impls)

    def make_noise() -> NoiseModel | None:
        honest = honest_traces(req, count, modes, prompts, traces, pure_port, separate, take, ref_traces)
        return measure(ref_traces, honest, table, ref_full, replay) if honest else None

    if base:
        table_key = tuple(sorted((k, repr(v)) for k, v in table.items()))
        noise = req.cache.value(("noise", *base, tuple(dict.fromkeys(req.dtypes)), count, tuple(modes), pure_port,
                                 table_key, req.raw_logits), make_noise, copy_noise)
    else:
        noise = make_noise()
    ours = [t for t in traces[n_ref:] if f"{t.impl}@{t.dtype}" not in held]
    results = compare_all(ref_traces, ref_full, ours, table, noise, req.raw_logits, req.layers)
    # routing is a choice, not a number: moe.experts compared as one, honest near-tie flips replayed
    results, routed = account_routing(results, ref_traces, ours, table, noise, replay, req.layers, ref_full)
    quant = []
    for label, h in held.items():  # quantized runs: against the port on their own weights, the loss apart
        theirs = [t for t in traces[n_ref:] if f"{t.impl}@{t.dtype}" == label]
        got = compare_all(h.refs, h.full, theirs, table, h.noise, req.raw_logits, req.layers)
        got, flips = account_routing(got, h.refs, theirs, table, h.noise, held_replayer(ref_adapter, spec, h.weights,
                                                                                          weights.hash),
                                     req.layers, h.full)
        results += got
        routed += flips
        if h.weights_hash != weights.hash:  # quantized weights; a kernel's rounding alone is no quantization loss
            quant.append(quantization_loss(label, h, ref_traces, theirs, table, req.raw_logits, req.layers,
                                           quant_budget(req, h.weight_type)))
    check_compared(runs, results)
    report = Report(
        spec=spec, weights_hash=weights.hash, weights_source=weights.source,
        reference=f"{ref_name}@{ref_dtype}", prompts=prompts, runs=runs, results=results,
        traces=traces, skipped=skipped, effective=effective, tolerances=table, weights=weights, noise=noise,
        continuation=cont, routing=routed, held=held, quant=quant,
    )
    if separate and req.trace_dir is None:
        import weakref

        weakref.finalize(report, shutil.rmtree, trace_dir, True)  # the lazy traces read from there until then

    with using(req.cache):  # the counterfactual searches' captures (parity.diagnose.counterfactuals)
        diagnose(report)
    return report


def held_references(req: Request, impls, modes_for, spec: GemmaSpec, weights: Weights, take, ref, ref_modes,
                    modes, count: int, table, separate: bool, ordinary: tuple[dict, dict]) -> dict:
    """"impl@dtype" -> parity.compare.held.HeldReference, for each run whose implementation computes with other
    weights than it was given (a quantizing runtime: Adapter.held); one reference per distinct held weight set
    and activation rounding, shared by every run that holds it."""
    from parity.compare.held import held_reference

    groups: dict = {}
    for name, adapter in impls:
        for d in req.dtypes:
            if not modes_for(adapter, d):
                continue
            h = held_of(req, name, adapter, spec, weights, d)
            if h is None:
                continue
            hh = h.weights.hash  # once: a runtime's held weights are dequantized again for every hash
            if hh == weights.hash and not h.activations and not getattr(h, "kv", None):
                continue  # it computes with the weights it was given, as the port rounds: the ordinary reference
            if dataclasses.replace(h.weights.spec, tied_head=spec.tied_head) != spec:  # an untied head: allowed
                raise ImplementationError(f"{adapter.name}@{d}", "held", "its held weights are for another spec",
                                          "Adapter.held must return weights of the spec it was given")
            key = (hh, h.activations, getattr(h, "kv", None))
            groups.setdefault(key, (h, []))[1].append(f"{adapter.name}@{d}")
    out = {}
    for h, labels in groups.values():
        dtypes = [label.rsplit("@", 1)[1] for label in labels]
        replay = held_replayer(ref[1], spec, h.weights, weights.hash)
        # the given weights, rounded otherwise (an F16 cache): the ordinary reference is already theirs
        same = h.weights.hash == weights.hash and h.weights.spec == spec
        got = held_reference(h, take, ref, ref_modes, dtypes, modes, count, table, separate, replay, FULL,
                             req.reference[1], weights.hash, spec.to_dict(), ordinary if same else None)
        got.runs = labels
        out.update({label: got for label in labels})
    return out


def held_replayer(ref_adapter, spec: GemmaSpec, held_weights: Weights, given: str):
    """The MoE replay (parity.compare.routing.replayer) of the reference on a run's held weights, its traces
    labelled with the given weights and the run's spec as the held reference's are (parity.compare.held), so
    that they pair with the run's traces."""
    replay = replayer(ref_adapter, held_weights.spec, held_weights)
    if replay is None:
        return None
    return lambda ref, overrides: dataclasses.replace(replay(ref, overrides), weights_hash=given, spec=spec.to_dict())


def held_of(req: Request, name: str, adapter, spec: GemmaSpec, weights: Weights, dtype: str):
    """The adapter's Held (parity.adapters.base), asked in this process; an implementation captured in another
    process (real sizes) is asked through its own built-in adapter, which only writes and reads its file here."""
    from parity.adapters.declared import held

    if isinstance(adapter, Elsewhere):
        from parity.adapters.registry import BUILTINS

        if name in BUILTINS and not BUILTINS[name].holds:
            return None  # a built-in that says it holds the given weights: its module is not imported here
        from parity.adapters import get_adapter

        adapter = get_adapter(name, req.runtime)  # a quantizing built-in, or a plug-in that may be one
    try:
        return held(adapter, spec, weights, dtype)
    except ParityInputError:
        raise
    except Exception as e:  # noqa: BLE001 -- its file could not be written or read back: it failed, not a verdict
        raise ImplementationError(f"{name}@{dtype}", "held", f"{type(e).__name__}: {e}",
                                  "the weights it holds could not be read back from its own file") from e


def quant_budget(req: Request, weight_type: str) -> float | None:
    """The quantization-loss budget of a weight type: --quant-budget's, else the documented default."""
    from parity.compare.quant import default_budget

    budget = req.quant_budget
    if isinstance(budget, dict):
        return budget.get(weight_type.split()[0].lower(), default_budget(weight_type))
    return default_budget(weight_type) if budget is None else budget


def quantization_loss(label: str, h, ref_traces: dict, theirs: list[Trace], table, raw_logits: bool,
                      layers: list[int] | None, budget: float | None):
    """A quantized run against the reference on the given weights (table only): parity.compare.quant."""
    from parity.compare.quant import measure_loss

    impl, dtype = label.rsplit("@", 1)
    # in prompt-name order: the mean KL is summed in that order, the same whatever order saved traces are passed
    cum = sorted((t for t in theirs if t.mode == "cumulative"), key=lambda t: t.prompt)
    against = compare_all(ref_traces, {}, cum, table, None, raw_logits, layers) if cum else []
    return measure_loss(impl, dtype, h.weight_type, h.activations, against, ref_traces, cum, budget)


def copy_noise(noise: NoiseModel | None) -> NoiseModel | None:
    """A noise model a run may edit (NoiseModel.add) without changing the cached one."""
    return None if noise is None else NoiseModel(members=noise.members, stats=dict(noise.stats))


def honest_traces(req: Request, count: int, modes: list[str], prompts: dict, traces: list[Trace], pure_port: bool,
                  separate: bool, take, ref_traces: dict) -> list[Trace]:
    """The honest ensemble's traces in every dtype but the reference's (parity.compare.noise), reusing the port's
    own runs as the first member's where the port ran unchanged."""
    honest: list[Trace] = []
    ref_dtype = req.reference[1]
    produced_modes = [p for m in modes for p in produced(m)]
    for d in dict.fromkeys(req.dtypes) if count else ():
        if d == ref_dtype:
            continue  # the reference dtype's honest error is the reference's own: the table's floor decides
        for m in members(count):
            own = [dataclasses.replace(t, impl=m.impl) for t in traces  # the port already ran: reuse it
                   if not m.options and pure_port and (t.impl, t.dtype) == (PORT, d) and t.mode in produced_modes]
            if own and len(own) == len(produced_modes) * len(prompts):
                honest += own
                continue
            # in separate processes the child builds the member: this process imports no framework
            honest += take(factory_spec(m) if separate else m.impl, None if separate else m.adapter(), d, modes,
                           ref_traces, checked=False)
    return honest


def decode_plan(req: Request, spec: GemmaSpec, prompts: dict[str, list[int]]) -> list[int]:
    """The continuation every implementation decodes (empty: no decode run), checked before any work."""
    steps = req.decode
    if req.decode_tokens is not None:
        cont = validate_tokens("decode_tokens", list(req.decode_tokens), spec)
    elif steps in (0, None):
        return []
    else:
        if steps == "auto":
            steps = auto_steps(spec)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ParityInputError(f"{{option}} {steps!r} is not a step count; give N >= 0 or 'auto' (twice the "
                                   "longest sliding window, plus two)", option="decode")
        cont = continuation(spec, steps, req.seed + 4321)
    check_lengths(spec, prompts, cont)
    return cont


def from_traces(traces: list[Trace], reference: tuple[str, str] = REFERENCE, weights: Weights | None = None,
                tolerances: dict[str, Tolerance] | None = None, layers: list[int] | None = None,
                raw_logits: bool = False) -> Report:
    """A report from trace files captured elsewhere (another process, another machine, `--save-traces`).

    The reference is the trace set whose impl@dtype is `reference`: its cumulative traces are what the
    prefill traces are compared with, its full forwards (mode decode-full) what decode traces are; the
    pairing is run()'s own (parity.compare.pairs.pair_traces), so a run's saved traces give its report
    back (without the honest-noise model, whose members' traces are not saved: the fixed table decides).
    Weight-based probes and counterfactuals need the weights; without them those probes say "cannot tell".
    """
    if not traces:
        raise ParityInputError("no traces given; pass --trace FILE at least twice")
    ref_key = tuple(reference)
    from parity.compare.held import from_saved

    # quantized runs' held references (--save-traces writes them with Trace.held): judged as live, the loss apart
    held, budgets = from_saved([t for t in traces if t.held is not None], FULL)
    traces = [t for t in traces if t.held is None]
    if not any((t.impl, t.dtype) == ref_key for t in traces):
        have = ", ".join(sorted({f"{t.impl}@{t.dtype}" for t in traces}))
        raise ParityInputError(f"{{option}} {reference[0]}@{reference[1]} is not among the traces ({have}); "
                               "pass the reference's trace too, or {option} one of those", option="reference")
    ref_name = f"{ref_key[0]}@{ref_key[1]}"
    refs = {t.prompt: t for t in traces if (t.impl, t.dtype) == ref_key and t.mode == "cumulative"}
    ref_full = {t.prompt: t for t in traces if (t.impl, t.dtype) == ref_key and t.mode == FULL}
    if not refs:
        raise ParityInputError(f"no cumulative trace of the reference {ref_name} among the traces")
    first_ref = next(iter(refs.values()))
    spec = GemmaSpec.from_dict(first_ref.spec)
    if weights is not None and weights.hash != first_ref.weights_hash:
        raise ParityInputError("{option} are not the weights the traces were captured from (hash differs)",
                               option="weights")
    others = [t for t in traces if not ((t.impl, t.dtype) == ref_key and t.mode == "cumulative")]
    for t in others:
        if t.prompt not in refs:
            raise ParityInputError(f"trace {t.label} prompt {t.prompt!r} has no reference trace of that prompt")
        if t.mode == DECODE and t.prompt not in ref_full:
            raise ParityInputError(f"decode trace {t.label} prompt {t.prompt!r} has no reference full forward to be "
                                   f"compared with; pass {ref_name}'s {FULL} trace of that prompt too "
                                   "(--save-traces writes it beside the others)")
    cont = _continuation(refs, ref_full)
    compared = [t for _, t in pair_traces(refs, ref_full, others)]
    if not compared:
        raise ParityInputError(f"nothing to compare: the traces are all the reference {ref_name}'s (or full "
                               "forwards, which are ground truth); pass at least one other trace with --trace")
    # one run per (impl, dtype, mode) compared, decode-self included, in order of first appearance
    runs = list({(t.impl, t.dtype, t.mode): Run(t.impl, t.version, t.dtype, t.mode) for t in compared}.values())
    effective = {ref_name: first_ref.effective}
    for t in compared:
        effective.setdefault(f"{t.impl}@{t.dtype}", t.effective)
    table = tolerances or TOLERANCES
    ours = [t for t in others if f"{t.impl}@{t.dtype}" not in held]
    results = compare_all(refs, ref_full, ours, table, None, raw_logits, layers)
    results, routed = account_routing(results, refs, ours, table, None, None, layers, ref_full)
    quant = []
    for label in dict.fromkeys(f"{t.impl}@{t.dtype}" for t in others if f"{t.impl}@{t.dtype}" in held):
        h = held[label]
        theirs = [t for t in others if f"{t.impl}@{t.dtype}" == label]
        got = compare_all(h.refs, h.full, theirs, table, h.noise, raw_logits, layers)
        got, flips = account_routing(got, h.refs, theirs, table, h.noise, None, layers, h.full)
        results += got
        routed += flips
        if label in budgets:
            quant.append(quantization_loss(label, h, refs, theirs, table, raw_logits, layers, budgets[label]))
    check_compared(runs, results)
    report = Report(
        spec=spec, weights_hash=first_ref.weights_hash,
        weights_source=weights.source if weights else "from traces", reference=ref_name,
        prompts={p: t.tokens for p, t in refs.items()}, runs=runs, results=results, traces=list(traces),
        skipped={}, effective=effective, tolerances=table, weights=weights, continuation=cont, routing=routed,
        held={label: h for label, h in held.items() if label in {f"{r.impl}@{r.dtype}" for r in runs}}, quant=quant,
    )

    diagnose(report)
    return report


def _continuation(refs: dict[str, Trace], ref_full: dict[str, Trace]) -> list[int]:
    """The tokens decoded after each prompt, read from the reference's full forwards (empty: no decode)."""
    conts = {}
    for prompt, t in ref_full.items():
        head, tail = list(t.tokens[:t.prefill]), list(t.tokens[t.prefill:])
        if prompt in refs and head != list(refs[prompt].tokens):
            raise ParityInputError(f"the reference's {FULL} trace of prompt {prompt!r} starts with other tokens than "
                                   "its cumulative trace; pass traces of one run")
        conts[prompt] = tail
    if len({tuple(c) for c in conts.values()}) > 1:
        each = ", ".join(f"{p}: {c}" for p, c in conts.items())
        raise ParityInputError(f"the reference's {FULL} traces decode different continuations per prompt ({each}); "
                               "pass the traces of one run")
    return next(iter(conts.values()), [])
