"""Capture: build one implementation in one dtype, run every prompt, return traces.

The model is built once per (implementation, dtype) and released before the
next is built, so only one implementation is resident at a time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Callable

from parity.adapters.declared import Declared, declared
from parity.adapters.offline import offline
from parity.errors import ImplementationError, ParityInputError, cli_flag, phase
from parity.capture.implementations import Selection, check_adapter, checked_impls
from parity.model.spec import GemmaSpec
from parity.capture.decode import DECODE, decode_rows, FULL, full_rows
from parity.model.taps import decode_tap_order, layer_of, tap_names, tap_order
from parity.capture.trace import load_trace, ReducedTap, Trace, widen
from parity.model.weights import load_weights, save_weights, Weights
from parity.adapters import get_adapter
from parity.adapters.base import RunResult
from parity.model.weight_store import StoredTensors
from parity.numerics.metrics import round_to

Progress = Callable[[str], None]


class Feed(Mapping):
    """tap -> the reference's input to it, read from the reference trace when asked (it may be a file)."""
    def __init__(self, ref: Trace, sources: dict[str, str]) -> None:
        self.ref, self.sources = ref, sources

    def __getitem__(self, tap: str):
        value = self.ref.taps[self.sources[tap]]
        if isinstance(value, ReducedTap):
            raise ParityInputError(f"isolated mode needs the reference's whole {self.sources[tap]!r}, but its trace "
                                   "holds it reduced; capture the reference without --reduce-over")
        return value

    def __iter__(self):
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


def isolated_feed(spec: GemmaSpec, ref: Trace) -> Feed:
    """For every sub-layer, the reference's value of the tap that feeds it.

    Feeding the input of the module that produces tap X with the reference's
    input to X makes X's error local: nothing computed upstream leaks in.
    """
    feed = {}
    for tap in tap_names(spec):
        i = layer_of(tap)
        if i is None:
            if tap == "final_norm":
                feed[tap] = f"layers.{spec.num_layers - 1}.out"
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
            feed[tap] = source
    return Feed(ref, feed)


@offline()
def capture(
    adapter,
    spec: GemmaSpec,
    weights: Weights,
    dtype: str,
    prompts: dict[str, list[int]],
    mode: str | list[str] = "cumulative",
    references: dict[str, Trace] | None = None,
    progress: Progress | None = None,
    spill: Callable[[Trace], Trace] | None = None,
    continuation: list[int] | None = None,
    checked: bool = False,
) -> list[Trace]:
    """Every prompt in every mode (a str or a list: the model is built once for all of them).

    `spill`, when given, takes each trace as soon as it is complete and returns
    what to keep instead (a lazily read file), so a process holds the model and
    one trace rather than the model and all of them. Mode `decode` (with
    `continuation`) gives two traces per prompt, the full forward over prompt +
    continuation (`decode-full`) and the decode through the library's cache
    (`decode`), both in parity.capture.decode's layout; mode `decode-full` the first alone.
    `checked`: the caller has already passed `adapter` through parity.capture.implementations.check_adapter for
    this spec and dtype (the harness does, for every run, before any work), so it is not asked again.
    """
    say = progress or (lambda _msg: None)
    own = declared(adapter)
    impl = own.name
    if not checked:
        check_adapter(adapter, spec, dtype)
    say(f"{impl} {dtype}: building")
    with _phase(impl, dtype, "build()"):
        model = adapter.build(spec, weights, dtype)
    modes = [mode] if isinstance(mode, str) else list(mode)
    try:
        traces = []
        for mode, (name, ids) in ((m, p) for m in modes for p in prompts.items()):
            if mode in (DECODE, FULL):
                got = _capture_decode(adapter, own, model, spec, weights, dtype, name, ids, continuation or [],
                                      mode, say)
                traces += [spill(t) if spill else t for t in got]
                continue
            say(f"{adapter.name} {dtype} {mode}: running prompt {name!r} ({len(ids)} tokens)")
            feed = None
            if mode == "isolated":
                if not references or name not in references:
                    raise ParityInputError("isolated mode needs the reference trace of each prompt first")
                feed = isolated_feed(spec, references[name])
            with _phase(impl, dtype, f"run() ({mode}, prompt {name!r})"):
                result = adapter.run(model, ids, feed=feed)
            unavailable = _declared_unavailable(own, getattr(result, "unavailable", None))
            check_contract(impl, dtype, mode, spec, result, unavailable)
            order = [t for t in tap_order(spec) if t in result.taps]
            extra = [t for t in result.taps if t not in order]  # attention internals etc.
            trace = Trace(
                impl=adapter.name, version=adapter.version(), dtype=dtype, spec=spec.to_dict(),
                weights_hash=weights.hash, tokens=list(ids), prompt=name, mode=mode,
                taps={t: result.taps[t] for t in order + extra}, unavailable=unavailable,
            )
            if spill is None:  # kept in memory: float32 (exact), as every consumer of a trace expects
                trace.taps = {k: widen(v) for k, v in trace.taps.items()}
            del result
            traces.append(spill(trace) if spill else trace)
        with _phase(impl, dtype, "effective()"):
            effective = adapter.effective(model)  # after the runs: an adapter may read what they observed
        if "isolated" in modes:
            # with cumulative beside it, every prompt is checked; isolated alone costs one un-fed run of the
            # shortest prompt, so an adapter that ignores `feed` is caught in --mode isolated too
            for name in prompts if "cumulative" in modes else [min(prompts, key=lambda k: len(prompts[k]))]:
                got = {t.mode: t for t in traces if t.prompt == name}
                own_run = got.get("cumulative") or _unfed_run(adapter, model, spec, weights, dtype, name,
                                                              prompts[name])
                check_feed_used(impl, dtype, own_run, got["isolated"], references[name], spec)
        for t in traces:
            t.effective = effective
        return traces
    finally:
        with _phase(impl, dtype, "release()"):
            adapter.release(model)
        del model


def _unfed_run(adapter, model, spec: GemmaSpec, weights: Weights, dtype: str, name: str, ids: list[int]) -> Trace:
    """One run of prompt `name` without the feed: what the isolated run must differ from if it uses the feed."""
    impl = declared(adapter).name
    with _phase(impl, dtype, f"run() (cumulative, prompt {name!r}, checking the isolated feed is used)"):
        result = adapter.run(model, ids, feed=None)
    return Trace(impl=adapter.name, version=adapter.version(), dtype=dtype, spec=spec.to_dict(),
                 weights_hash=weights.hash, tokens=list(ids), prompt=name, mode="cumulative",
                 taps={k: widen(v) for k, v in getattr(result, "taps", {}).items()})


def _capture_decode(adapter, own: Declared, model, spec: GemmaSpec, weights: Weights, dtype: str, name: str,
                    ids: list[int], cont: list[int], mode: str, say) -> list[Trace]:
    """The full forward over prompt + continuation (decode-full) and, for `decode`, the decode itself."""
    impl = own.name
    P, S = len(ids), len(cont)
    tokens = list(ids) + list(cont)
    meta = dict(impl=adapter.name, version=adapter.version(), dtype=dtype, spec=spec.to_dict(),
                weights_hash=weights.hash, tokens=tokens, prompt=name, prefill=P)
    say(f"{adapter.name} {dtype} decode: full forward over prompt {name!r} + {S} tokens")
    kw = {"cache_taps": True} if own.full_cache_taps else {}
    with _phase(impl, dtype, f"run() (decode-full, prompt {name!r})"):
        result = adapter.run(model, tokens, **kw)
    unavailable = _declared_unavailable(own, getattr(result, "unavailable", None))
    check_contract(impl, dtype, FULL, spec, result, unavailable, cache=True)
    order = {t: i for i, t in enumerate(decode_tap_order(spec))}
    forward = lambda taps: {k: widen(taps[k]) for k in sorted(taps, key=lambda k: order.get(k, 10**6))}  # noqa: E731
    full = Trace(**meta, mode=FULL, taps=forward(full_rows(result.taps, spec, P, S)), unavailable=unavailable)
    del result
    if mode == FULL:
        return [full]
    if not own.decodes:
        raise ParityInputError(f"{impl} cannot decode (its adapter does not declare decodes = True); drop it from "
                               "{option} or implement Adapter.decode", option="impls")
    say(f"{adapter.name} {dtype} decode: prompt {name!r}, then {S} steps through its cache")
    with _phase(impl, dtype, f"decode() (prompt {name!r}, {S} steps)"):
        result = adapter.decode(model, list(ids), list(cont))
        rows, unavailable = decode_rows(result, spec, P, S, f"{impl}@{dtype}")
    said = _declared_unavailable(own, unavailable)
    check_contract(impl, dtype, DECODE, spec, RunResult(rows), said, cache=True)
    dec = Trace(**meta, mode=DECODE, taps=forward(rows), unavailable=said)
    return [full, dec]


def _declared_unavailable(own: Declared, returned: dict | None) -> dict[str, str]:
    """The taps an implementation cannot give: its class's `cannot`, then what this run's result declares."""
    return {**own.cannot, **(returned or {})}


def check_contract(impl: str, dtype: str, mode: str, spec: GemmaSpec, result, unavailable: dict,
                   cache: bool = False) -> None:
    """What parity.adapters.base promises, checked before anything is compared (a breach is exit 3).

    Every canonical tap of the spec is returned or declared unavailable with a reason; no tap has a name
    the contract does not know (a misspelt tap is not silently ignored); every value is a numpy array.
    """
    import numpy as np

    where = f"run() ({mode})"
    taps = getattr(result, "taps", None)
    if not isinstance(taps, Mapping):
        raise ImplementationError(f"{impl}@{dtype}", where, f"returned {type(result).__name__}, not a RunResult",
                                  "return parity.adapters.base.RunResult(taps={name: numpy array})")
    known = set(decode_tap_order(spec) if cache else tap_order(spec))
    for what, names in (("returned", list(taps)), ("declared unavailable", list(unavailable))):
        unknown = [t for t in names if t not in known]
        if unknown:
            raise ImplementationError(
                f"{impl}@{dtype}", where, f"{what} {len(unknown)} tap name(s) the contract does not know, first "
                f"{unknown[0]!r}", "use the canonical names documented in parity.adapters.base")
    for t, v in taps.items():
        if not isinstance(v, np.ndarray):
            raise ImplementationError(
                f"{impl}@{dtype}", where, f"tap {t!r} is a {type(v).__module__}.{type(v).__name__}, not a numpy "
                "array", "return numpy arrays (for torch: tensor.detach().float().cpu().numpy())")
    missing = [t for t in tap_names(spec) if t not in taps and t not in unavailable]
    if missing:
        raise ImplementationError(
            f"{impl}@{dtype}", where, f"{len(missing)} required tap(s) neither returned nor declared unavailable "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})",
            "return them, or declare each in RunResult.unavailable (or Adapter.cannot) with the reason")


def check_feed_used(impl: str, dtype: str, cumulative: Trace, isolated: Trace, ref: Trace, spec: GemmaSpec) -> None:
    """An adapter that ignores `feed` returns its cumulative taps again in isolated mode; refuse to call that isolated.

    Judged on the taps the feed replaces the input of (attention and MLP outputs): all of them equal to
    the cumulative ones, bit for bit, although the reference input fed differs from the run's own.
    """
    import numpy as np


    feed = isolated_feed(spec, ref)
    checked, differs = 0, False
    for tap in (f"layers.{i}.{k}" for i in range(spec.num_layers) for k in ("attn", "mlp")):
        src = feed.sources.get(tap)
        if src is None or tap not in isolated.taps or tap not in cumulative.taps or src not in cumulative.taps:
            continue
        a, c = isolated.taps[tap], cumulative.taps[tap]
        if isinstance(a, ReducedTap) or isinstance(c, ReducedTap):
            continue
        if not np.array_equal(np.asarray(a, np.float64), np.asarray(c, np.float64)):
            return  # the feed changed something: the adapter uses it
        checked += 1
        fed, own = round_to(np.asarray(ref.taps[src], np.float64), dtype), np.asarray(cumulative.taps[src], np.float64)
        differs |= fed.shape == own.shape and not np.array_equal(fed, own)
    if checked and differs:
        raise ImplementationError(
            f"{impl}@{dtype}", "run() (isolated)", f"ignores feed: its isolated taps equal its cumulative taps at "
            f"all {checked} fed sub-layers although the reference inputs fed differ from its own",
            "replace each fed module's input with feed[tap] in run() (parity.adapters.torch_hooks does it for "
            "torch modules); until then run --mode cumulative")


_phase = phase  # the old name


# ------------------------------------------------------------- in another process
def trace_file(out_dir, impl: str, dtype: str, mode: str, prompt: str):
    """The one name of a trace file: inside `out_dir` whatever the implementation or prompt is called."""
    from parity.capture.paths import inside

    return inside(out_dir, f"{impl}@{dtype}.{mode}.{prompt}.safetensors")


def capture_in_subprocess(impl: str, spec: GemmaSpec, weights: Weights, dtype: str, prompts: dict[str, list[int]],
                          mode: str | list[str] = "cumulative", references: dict[str, Trace] | None = None,
                          progress: Progress | None = None, out_dir=None, reduce_over: int | None = None,
                          full_taps: str | None = None, continuation: list[int] | None = None,
                          settings: dict | None = None) -> list[Trace]:
    """Run one implementation in a fresh Python process and read its traces back from files.

    For implementations that cannot share a process with others (keras on a
    second backend), and for real sizes: one implementation resident at a
    time, its memory returned to the system when the process ends, traces on
    disk. Stored weights and traces already on disk are passed by path, never
    copied. With `out_dir` the traces stay there and come back lazily (read tap
    by tap); without it they are read whole from a temporary directory.
    """
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path


    say = progress or (lambda _msg: None)
    with tempfile.TemporaryDirectory(prefix="parity-capture-") as tmp:
        tmp = Path(tmp)
        wpath = weights.tensors.path if weights.stored else save_weights(weights, tmp / "weights.safetensors")
        (tmp / "prompts.json").write_text(json.dumps(prompts))
        out = Path(out_dir) if out_dir is not None else tmp / "out"
        modes = [mode] if isinstance(mode, str) else list(mode)
        cmd = [sys.executable, "-m", "parity.capture", "--impl", impl, "--dtype", dtype, "--mode", ",".join(modes),
               "--weights", str(wpath), "--prompts", str(tmp / "prompts.json"), "--out", str(out)]
        cmd += ["--spec-json", json.dumps(spec.to_dict())]  # the weights file may hold a deeper spec
        if reduce_over is not None:
            cmd += ["--reduce-over", str(reduce_over)]
        if full_taps:
            cmd += ["--full-taps", full_taps]
        if continuation:
            cmd += ["--continuation", json.dumps(list(continuation))]
        if settings:
            cmd += ["--settings", json.dumps(dict(settings))]
        cmd += ["--peak-file", str(tmp / "peak.json")]
        if references:
            refs = {}
            for name, t in references.items():
                source = getattr(t.taps, "path", None)  # a lazily read trace is already a file
                refs[name] = str(source) if source else str(t.save(tmp / "refs" / f"{name}.safetensors"))
            (tmp / "refs.json").write_text(json.dumps(refs))
            cmd += ["--references", str(tmp / "refs.json")]
        say(f"{impl} {dtype} {'+'.join(modes)}: running in a separate process")
        import os
        import time

        start = time.perf_counter()
        with open(tmp / "stderr", "w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            err.seek(0)
            stderr = err.read()
        if proc.returncode != 0:
            last = (stderr.strip().splitlines() or ["(no output)"])[-1]
            if proc.returncode == 2:
                raise ParityInputError(last.removeprefix("parity: error: "))
            why = (f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
                   if proc.returncode < 0 else last.removeprefix("parity: implementation failed: "))
            raise ImplementationError(f"{impl}@{dtype}", "capture in a separate process", why,
                                      "the child's output is in the log", traceback=stderr)
        lazy = out_dir is not None
        traces = [load_trace(trace_file(out, impl, dtype, m2, p), lazy=lazy) for m in modes for p in prompts
                  for m2 in produced(m)]
        # the child's own peak, as it measured it; wait4's maxrss is no run's own: Linux carries the peak of the
        # memory the child was forked from (this process's) across exec, so every run would read at least this
        # process's peak so far. Only a child that wrote no file (a plug-in's own entry point) falls back to it.
        peak = tmp / "peak.json"
        mb = json.loads(peak.read_text())["peak_rss_mb"] if peak.is_file() else round(usage.ru_maxrss / 1024, 1)
        for t in traces:  # kept in memory for the report's runs, not in the trace file
            t.resources = {"process": "separate", "wall_s": round(time.perf_counter() - start, 2),
                           "peak_rss_mb": mb}
        return traces


def own_peak_rss_mb() -> float:
    """This process's own peak resident memory in MiB since its exec (VmHWM), or its reaped children's where one
    peaked higher (a builder it ran): the peak of its process tree at any one time is at least the larger.
    Not getrusage(RUSAGE_SELF) alone: on Linux that keeps the peak of the process it was forked from."""
    import resource
    import sys
    from pathlib import Path

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    try:
        status = Path("/proc/self/status").read_text()
        own_kb = int(status.split("VmHWM:")[1].split()[0])
    except (OSError, IndexError, ValueError):  # no procfs (macOS): ru_maxrss there is bytes, and no exec carry-over
        own_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            own_kb, children = own_kb / 1024, children / 1024
    return round(max(own_kb, children) / 1024, 1)


def produced(mode: str) -> list[str]:
    """The trace modes one capture mode writes per prompt, in order."""
    return [FULL, DECODE] if mode == DECODE else [mode]


class _OneLineParser:
    """argparse whose errors are one line, `parity: error: ...`, exit 2 (argparse prints usage and a second line)."""

    @staticmethod
    def make(**kw):
        import argparse

        class Parser(argparse.ArgumentParser):
            def error(self, message):
                raise ParityInputError(f"{message}; see python -m parity.capture --help")

        return Parser(**kw)


@offline()  # the child process: its library calls never reach for the network
def main(argv: list[str] | None = None) -> int:
    """`python -m parity.capture`: capture one implementation's traces into files.

    The same contract as `python -m parity.report`: 0 captured, 2 bad input (one line, checked before any
    capture, nothing left in --out), 3 the implementation failed (its traceback, then one line), 130 interrupted.
    """
    import fnmatch
    import json
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    checking = "--check" in argv  # --check needs no capture arguments
    ap = _OneLineParser.make(prog="python -m parity.capture", description=main.__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check --impls (default: every built-in) can "
                                                          "run --spec-json in --dtypes; print JSON")
    ap.add_argument("--impls", help="with --check: comma-separated implementations")
    ap.add_argument("--dtypes", help="with --check: comma-separated dtypes")
    ap.add_argument("--reference", default="litgpt-style@float64", help="with --check: impl@dtype")
    ap.add_argument("--impl", required=not checking)
    ap.add_argument("--dtype", required=not checking)
    ap.add_argument("--weights", required=not checking,
                    help="canonical weights written by parity (spec in metadata)")
    ap.add_argument("--prompts", required=not checking,
                    help="JSON file: prompt name -> token ids")
    ap.add_argument("--mode", default="cumulative")
    ap.add_argument("--references", help="JSON file: prompt -> reference trace file (isolated mode)")
    ap.add_argument("--spec-json", help="the spec to build, when it differs from the weights' (a truncated depth)")
    ap.add_argument("--reduce-over", help="store taps of more than N elements reduced (N >= 0)")
    ap.add_argument("--full-taps", help="glob patterns of taps never reduced")
    ap.add_argument("--continuation", help="JSON list of token ids decoded after each prompt (modes decode, "
                                           "decode-full)")
    ap.add_argument("--settings", help="JSON object: the run-wide runtime settings (kv_type, flash_attn) given to "
                                       "built-ins that take them")
    ap.add_argument("--out", required=not checking)
    ap.add_argument("--peak-file", help="write this process's own peak RSS here (JSON) when the capture succeeds")
    made: list = []  # directories this run created, removed again on bad input
    written: list = []  # trace files this run wrote, likewise
    try:
        a = ap.parse_args(argv)
        if a.check:
            print(json.dumps(_check(a)))
            return 0
        job = _capture_job(a)  # every argument checked and read: nothing is built or written before this
        out = job["out"]
        made[:] = [d for d in [out, *out.parents] if not d.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ParityInputError(f"--out {a.out!r} cannot be created ({e.strerror}); choose a writable "
                                   "directory") from None

        spilled: list = []

        def spill(t):  # to disk at once, whole (effective is known only after every run): one trace in memory
            f = trace_file(out, a.impl, a.dtype, t.mode, t.prompt)  # inside --out whatever the impl is called
            spilled.append(f.with_name(f".{f.name}.spill"))
            return load_trace(t.save(spilled[-1]), lazy=True)

        try:
            for t in capture(job["adapter"], job["spec"], job["weights"], a.dtype, job["prompts"], mode=job["modes"],
                             references=job["refs"], spill=spill, continuation=job["cont"]):
                keep = [k for k in t.taps if any(fnmatch.fnmatchcase(k, p) for p in job["full_taps"])]
                written.append(trace_file(out, a.impl, a.dtype, t.mode, t.prompt))
                t.save(written[-1], reduce_over=job["reduce_over"], keep=keep)
                t.taps.path.unlink()
        finally:
            for f in spilled:  # never left behind, whatever the exit
                f.unlink(missing_ok=True)
        if a.peak_file:
            from pathlib import Path

            Path(a.peak_file).write_text(json.dumps({"peak_rss_mb": own_peak_rss_mb()}))
        return 0
    except ParityInputError as e:
        _remove_made(made, written)
        print(f"parity: error: {e.render(cli_flag)}", file=sys.stderr)
        return 2
    except ImplementationError as e:
        print(e.traceback, file=sys.stderr)
        print(f"parity: implementation failed: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        _remove_made(made, written)
        print("parity: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a crash is never success nor bad input: exit 3, the traceback first
        import traceback

        traceback.print_exc(file=sys.stderr)
        print(f"parity: internal error: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}; please report it",
              file=sys.stderr)
        return 3


def _remove_made(made: list, written: list) -> None:
    """Bad input leaves nothing behind: the traces this run wrote go, then the directories it made if empty."""
    for f in written:
        f.unlink(missing_ok=True)
    for d in made:
        try:
            d.rmdir()
        except OSError:
            break


def _capture_job(a) -> dict:
    """Every argument of a capture, checked (cheapest first) and read; bad input raises ParityInputError."""
    import os
    from pathlib import Path

    from parity.adapters.base import DTYPES
    from parity.model.prompts import validate_tokens

    if a.dtype not in DTYPES:
        raise ParityInputError(f"--dtype {a.dtype!r} is not a dtype; use one of {', '.join(DTYPES)}")
    modes = a.mode.split(",")
    known = ("cumulative", "isolated", DECODE, FULL)
    bad = [m for m in modes if m not in known]
    if bad:
        raise ParityInputError(f"--mode {a.mode!r}: {bad[0]!r} is not a mode; use a comma list of "
                               f"{', '.join(known)}")
    if len(set(modes)) != len(modes):
        raise ParityInputError(f"--mode {a.mode!r} names a mode twice; give each once")
    cont = None
    if a.continuation is not None:
        cont = _json_arg(a.continuation, "--continuation", "a JSON list of token ids, e.g. [17, 301]")
        if not isinstance(cont, list) or not cont or not all(_is_id(t) for t in cont):
            raise ParityInputError(f"--continuation {_clip(a.continuation)} is not a non-empty JSON list of token "
                                   "ids (integers >= 0); give e.g. [17, 301]")
    if any(m in (DECODE, FULL) for m in modes) and not cont:
        raise ParityInputError(f"--mode {a.mode!r} needs --continuation (the tokens to decode)")
    if "isolated" in modes and not a.references:
        raise ParityInputError("--mode isolated needs --references (the reference's traces to feed)")
    reduce_over = None
    if a.reduce_over is not None:
        text = a.reduce_over.strip()
        if not (text.isascii() and text.isdigit()):
            raise ParityInputError(f"--reduce-over {a.reduce_over!r} is not an element count; give an integer >= 0 "
                                   "(0 reduces every tap)")
        reduce_over = int(text)
    full_taps = [p for p in (a.full_taps or "").split(",") if p]
    if not a.out:
        raise ParityInputError("--out '' is empty; give a directory (created if missing)")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise ParityInputError(f"--out {a.out!r} is an existing file; give a directory (created if missing)")
    base = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not base.is_dir():
        raise ParityInputError(f"--out {a.out!r} cannot be created ({base} is a file); choose a directory path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ParityInputError(f"--out {a.out!r} cannot be written ({base} is not writable); choose a writable "
                               "directory")
    spec = None
    if a.spec_json is not None:
        from parity.model.spec import GemmaSpec

        spec = GemmaSpec.from_dict(_json_arg(a.spec_json, "--spec-json", "GemmaSpec.to_dict() as JSON"))
    prompts = _read_json(a.prompts, "--prompts", "a JSON object of prompt name -> token ids")
    if not isinstance(prompts, dict) or not prompts:
        raise ParityInputError(f"--prompts {a.prompts!r} must hold a non-empty JSON object of prompt name -> "
                               "token ids, e.g. {\"p\": [2, 17, 301]}")
    for k, v in prompts.items():
        if not isinstance(v, list) or not v or not all(_is_id(t) for t in v):
            raise ParityInputError(f"--prompts {a.prompts!r}: prompt {k!r} is not a non-empty list of token ids "
                                   "(integers >= 0); give e.g. [2, 17, 301]")
    ref_files = None
    if a.references:
        ref_files = _read_json(a.references, "--references", "a JSON object of prompt name -> trace file")
        if not isinstance(ref_files, dict) or not all(isinstance(f, str) for f in ref_files.values()):
            raise ParityInputError(f"--references {a.references!r} must hold a JSON object of prompt name -> trace "
                                   "file path")
        missing = [p for p in prompts if p not in ref_files]
        if "isolated" in modes and missing:
            raise ParityInputError(f"--references {a.references!r} has no trace for prompt {missing[0]!r}; give one "
                                   "per prompt")
    adapter = get_adapter(a.impl, _settings(a))  # an unknown name before the weights are read
    if spec is not None:
        weights = load_weights(a.weights, spec if _has_no_spec(a.weights) else None)
    else:
        if _has_no_spec(a.weights):
            raise ParityInputError(f"--weights {a.weights!r} carries no spec in its metadata; give --spec-json "
                                   "with the spec's JSON (python -m parity.report writes weights that carry it)")
        weights = load_weights(a.weights)
        spec = weights.spec
    if spec != weights.spec:
        weights = weights.truncated(spec)
    prompts = {k: validate_tokens(k, v, spec) for k, v in prompts.items()}
    if cont:
        validate_tokens("continuation", cont, spec)
    refs = None if ref_files is None else {p: load_trace(f, lazy=True) for p, f in ref_files.items()}
    return dict(out=out, modes=modes, cont=cont, reduce_over=reduce_over, full_taps=full_taps, spec=spec,
                weights=weights, prompts=prompts, refs=refs, adapter=adapter)


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _clip(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _json_arg(text: str, flag: str, what: str):
    """A JSON value given on the command line, strictly (no NaN or Infinity)."""
    def no_constant(token):
        raise ValueError(f"{token} is not JSON")

    try:
        return json.loads(text, parse_constant=no_constant)
    except ValueError as e:  # JSONDecodeError is one
        raise ParityInputError(f"{flag} {_clip(text)} is not JSON ({e}); give {what}") from None
    except RecursionError:
        raise ParityInputError(f"{flag} is nested too deeply to be {what}") from None


def _read_json(path: str, flag: str, what: str):
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ParityInputError(f"{flag} {path!r} does not exist{' (a directory)' if p.is_dir() else ''}; give {what}")
    try:
        return _json_arg(p.read_bytes().decode("utf-8"), flag, what) if p.stat().st_size < (64 << 20) else \
            _too_big(flag, path, what)
    except UnicodeDecodeError:
        raise ParityInputError(f"{flag} {path!r} is not UTF-8 text; give {what}") from None
    except OSError as e:
        raise ParityInputError(f"{flag} {path!r} cannot be read ({e.strerror}); give {what}") from None


def _too_big(flag: str, path: str, what: str):
    raise ParityInputError(f"{flag} {path!r} is over 64 MB; give {what}")


def _has_no_spec(path: str) -> bool:
    from pathlib import Path

    if not Path(path).is_file():
        return False  # load_weights says it does not exist

    return "spec" not in StoredTensors(path).metadata


def _settings(a) -> dict[str, str]:
    if not a.settings:
        return {}
    got = _json_arg(a.settings, "--settings", 'a JSON object of setting -> value, e.g. {"kv_type": "q8_0"}')
    if not isinstance(got, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in got.items()):
        raise ParityInputError(f"--settings {a.settings!r} must be a JSON object of strings, e.g. "
                               '{"kv_type": "q8_0"}')
    return got


def _check(a) -> dict:
    from parity.adapters.base import DTYPES

    if a.spec_json is None:
        raise ParityInputError("--check needs --spec-json (the spec to check the implementations against)")
    spec = GemmaSpec.from_dict(_json_arg(a.spec_json, "--spec-json", "GemmaSpec.to_dict() as JSON"))
    ref_name, _, ref_dtype = a.reference.partition("@")
    if not ref_name or ref_dtype not in DTYPES:
        raise ParityInputError(f"--reference {a.reference!r} must be impl@dtype with a dtype of {', '.join(DTYPES)}; "
                               "e.g. litgpt-style@float64")
    dtypes = [d for d in (a.dtypes or "").split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ParityInputError(f"--dtypes {a.dtypes!r}: {'no dtype given' if not dtypes else repr(bad[0]) + ' is not a dtype'}"
                               f"; give a comma list of {', '.join(DTYPES)}")
    impls = [i for i in (a.impls or "").split(",") if i] or None
    req = Selection(spec=spec, impls=impls,
                    dtypes=dtypes, reference=(ref_name, ref_dtype), runtime=_settings(a))
    impls, skipped, ref = checked_impls(req, spec)
    return {"impls": {n: {"name": ad.name, "version": ad.version(), "decodes": declared(ad).decodes}
                      for n, ad in impls}, "skipped": skipped,
            "reference": [ref.name, ref.version()]}


if __name__ == "__main__":
    import sys

    sys.exit(main())
