"""`python -m parity.report`: run every implementation, compare layer by layer, write the report.

Exit status: 0 parity holds, 1 a divergence beyond honest noise (or a cause
named by a probe), 2 bad input (one line naming the problem and the fix;
nothing written), 3 an implementation failed to build or run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from parity.adapters import listing
from parity.adapters.offline import offline
from parity.capture.decode import parse_steps
from parity.errors import ImplementationError, ParityInputError, cli_flag
from parity.harness import Request
from parity.model.presets import resolve_spec
from parity.model.prompts import parse_tokens, text_to_tokens
from parity.model.taps import parse_layers
from parity.model.weights import load_weights
from parity.compare.quant import parse_budget
from parity.numerics.tolerances import load_overrides
from parity.report.files import OutDir, no_space, write_report


def parser() -> argparse.ArgumentParser:
    from parity.model.weights import PROFILES

    p = _OneLineParser(prog="python -m parity.report", description=__doc__.splitlines()[0],
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", help="preset name (default tiny-gemma) or path to a HuggingFace config.json")
    p.add_argument("--weights", help="canonical weights (.safetensors, HF names); default: seeded random")
    p.add_argument("--checkpoint", metavar="DIR", help="a local checkpoint directory (HuggingFace, keras-hub preset, "
                                                       "or litgpt with lit_model.safetensors): gives the spec and "
                                                       "the weights; pickled checkpoints are refused")
    p.add_argument("--impls", help=f"comma-separated implementations: names, entry points or module:factory "
                                   f"({listing()})")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (float64,float32,bfloat16,float16)")
    p.add_argument("--layers", default="all", help="'all' or indices and ranges, e.g. 0,2-3")
    p.add_argument("--taps", help="comma-separated glob patterns over tap names, e.g. 'layers.*.mlp.act,logits'")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", action="append", help="prompt text (tokenized with the checkpoint's tokenizer, "
                                                      "else bytes); repeatable")
    g.add_argument("--tokens", action="append", help="comma-separated token ids; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--weights-profile", choices=PROFILES,
                   help="statistics of the seeded random weights: default, or trained-like (heavy-tailed norm "
                        "weights, a massive BOS activation, an attention sink)")
    p.add_argument("--mode", default="cumulative", help="cumulative, isolated or both")
    p.add_argument("--out", default="reports/latest", help="output directory (default reports/latest)")
    p.add_argument("--reference", default="litgpt-style@float64", help="impl@dtype every run is compared to")
    p.add_argument("--trace", action="append", help="compare traces captured elsewhere instead of running "
                                                     "(repeatable; written by --save-traces or python -m parity.capture)")
    p.add_argument("--save-traces", action="store_true", help="also write every trace under OUT/traces/")
    p.add_argument("--first-layers", type=int, metavar="N", help="run only the spec's first N layers, with the "
                                                                  "final norm and head on top (real sizes)")
    p.add_argument("--separate-processes", action="store_true", default=None,
                   help="capture each implementation and dtype in its own process (default at real sizes: "
                        "float32 weights over 1 GiB)")
    p.add_argument("--reduce-over", type=int, metavar="N", default=1 << 24,
                   help="store taps of more than N elements as statistics plus 16 sampled rows (separate "
                        "processes; default 16777216: a 256k-vocabulary logits tap); 0 reduces every tap")
    p.add_argument("--full-taps", metavar="GLOBS", help="taps kept whole whatever their size, e.g. 'logits'")
    p.add_argument("--waivers", metavar="FILE", help="accepted divergences (the format of fixtures/waivers.toml): "
                                                      "a waived cause and its taps count as passing, and say why")
    p.add_argument("--raw-logits", action="store_true",
                   help="require the logits themselves to match, not only up to a constant per position (a centred "
                        "unembedding changes no distribution and is otherwise a note, logit-shift)")
    p.add_argument("--noise-members", type=int, metavar="N",
                   help="size of the honest-noise ensemble (default 4, 2 at real sizes); 0: the fixed table alone")
    p.add_argument("--quant-budget", metavar="KL|TYPE=KL,...",
                   help="quantized runs (llama-cpp-q4_0, ort-genai-int4, ...): the mean KL (nats) of the next-token "
                        "distribution the quantization may cost against the unquantized reference, one number or "
                        "per weight type (q4_0=0.05,q8_0=0.002); over it the gate fails as quantization loss, apart "
                        "from any divergence (default per weight type: docs/verdict.md)")
    p.add_argument("--kv-cache", metavar="TYPE", help="llama-cpp runs: the KV-cache type (f32, f16, bf16, q8_0, "
                   "q4_0, q5_0; default f16, llama.cpp's own, set explicitly and shown with the run)")
    p.add_argument("--flash-attn", metavar="on|off", help="llama-cpp runs: the attention path (default off, the "
                   "path whose scores and probabilities can be captured; on: one fused kernel, K and V cast to f16)")
    p.add_argument("--decode", default="0", metavar="N|auto",
                   help="after each prompt, decode N tokens one at a time through every implementation's own KV "
                        "cache and compare each step layer by layer (and with the implementation's own full "
                        "forward); auto: twice the longest sliding window plus two, so every ring buffer wraps "
                        "(default 0: prefill only)")
    p.add_argument("--decode-tokens", metavar="IDS", help="comma-separated token ids to decode (teacher-forced), "
                                                          "instead of seeded ones; implies --decode")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop an implementation whose build, run or decode takes longer (exit 3 naming the phase; "
                        "default 1800, or PARITY_TIMEOUT; 0: no limit)")
    p.add_argument("--allow-large", action="store_true", help="run even when the up-front memory or disk estimate "
                                                               "says the machine cannot hold it (PARITY_ALLOW_LARGE=1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--verbose", action="store_true", help="print every effective-configuration property and "
                                                           "each library's own facts, not only the properties "
                                                           "that differ from the reference")
    return p


class _OneLineParser(argparse.ArgumentParser):
    """argparse's own refusals (a missing argument, a type, options that exclude each other) in one line, exit 2,
    as every other bad input: argparse prints the whole usage and then the error."""

    def error(self, message):
        self.exit(2, f"parity: error: {message}; see {self.prog} --help\n")


def check_blank(args) -> None:
    """An option given as '' (or blanks) would mean its default, silently: refused, naming it."""
    for opt, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if opt not in ("prompt", "tokens") and any(isinstance(v, str) and not v.strip() for v in values):
            raise ParityInputError(f"{cli_flag(opt)} is empty; give a value, or leave the option out for its "
                                   "default")


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def build_request(args):
    ckpt_dir = None
    if args.weights_profile and (args.weights or args.checkpoint):
        raise ParityInputError(f"--weights-profile {args.weights_profile} shapes the seeded random weights, but "
                               f"--{'weights' if args.weights else 'checkpoint'} gives the weights; drop one of them")
    if args.checkpoint:
        if args.spec or args.weights:
            raise ParityInputError("--checkpoint gives both the spec and the weights; drop --spec and --weights")
        from parity.model.checkpoints import load_checkpoint

        spec, weights = load_checkpoint(args.checkpoint)
        p = Path(args.checkpoint)
        ckpt_dir = str(p if p.is_dir() else p.parent)
    else:
        spec = resolve_spec(args.spec)
        if args.trace and not args.spec:  # the traces carry their spec
            from parity.model.spec import GemmaSpec
            from parity.capture.trace import load_trace

            spec = GemmaSpec.from_dict(load_trace(args.trace[0]).spec)
        weights = load_weights(args.weights, spec) if args.weights else None
    prompts = None
    if args.tokens:
        prompts = {f"tokens{i}": parse_tokens(t) for i, t in enumerate(args.tokens)}
    elif args.prompt:
        tok_dir = ckpt_dir or (str(Path(args.spec).parent) if args.spec and args.spec.endswith(".json") else None)
        tokenize = None
        if tok_dir:
            from parity.adapters.hf import tokenize as hf_tokenize

            tokenize = lambda text: hf_tokenize(text, tok_dir)  # noqa: E731
        prompts = {f"prompt{i}": text_to_tokens(t, spec, tokenize) for i, t in enumerate(args.prompt)}
    if "@" not in args.reference:
        raise ParityInputError(f"--reference {args.reference!r} must be impl@dtype, e.g. litgpt-style@float64")
    ref = tuple(args.reference.split("@", 1))
    return Request(
        spec=spec, impls=_split(args.impls), dtypes=_split(args.dtypes) or [],
        layers=parse_layers(args.layers, spec.num_layers), prompts=prompts, seed=args.seed, mode=args.mode,
        weights=weights, tolerances=load_overrides(), reference=ref, first_layers=args.first_layers,
        separate_processes=args.separate_processes, reduce_over=args.reduce_over, full_taps=args.full_taps,
        noise_members=args.noise_members, raw_logits=args.raw_logits, allow_large=args.allow_large,
        weights_profile=args.weights_profile or "default",
        quant_budget=parse_budget(args.quant_budget) if args.quant_budget is not None else None,
        runtime={k: v for k, v in (("kv_type", args.kv_cache), ("flash_attn", args.flash_attn)) if v is not None},
        decode=parse_steps(args.decode), decode_tokens=parse_tokens(args.decode_tokens) if args.decode_tokens
        else None,
    )


# options that shape a run; with --trace nothing runs, so giving one is a contradiction, not a no-op
RUN_ONLY = ("impls", "dtypes", "spec", "seed", "weights_profile", "mode", "first_layers", "separate_processes",
            "reduce_over", "full_taps", "noise_members", "decode", "decode_tokens", "prompt", "tokens", "checkpoint",
            "allow_large", "quant_budget", "kv_cache", "flash_attn")


def check_trace_options(args, p: argparse.ArgumentParser) -> None:
    """With --trace the traces say what ran: an option that would change a run is refused, not ignored."""
    if not args.trace:
        return
    given = [o for o in RUN_ONLY if getattr(args, o) != p.get_default(o)]
    if given:
        flags = ", ".join(cli_flag(o) for o in given)
        raise ParityInputError(f"{flags} shape(s) a run, but --trace compares traces that already ran (they name "
                               "their implementations, dtypes, spec, prompts and decode steps); drop "
                               f"{flags}, or drop --trace and run")


def check_unique(args) -> None:
    """A value listed twice would pool two runs into one row: refused, naming it."""
    for opt in ("impls", "dtypes"):
        values = _split(getattr(args, opt)) or []
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ParityInputError(f"{cli_flag(opt)} lists {twice[0]!r} more than once; list each once")


EXIT_CODES = """exit status:
  0  parity: every implementation within honest noise, and no cause named
  1  a divergence beyond honest noise, or a formula-level cause named by a probe
  2  bad input (one line naming the value and the fix; nothing written)
  3  an implementation failed to build or run, or timed out, or the disk is full (one line:
     implementation, phase, error; the traceback in OUT/parity-error.log)
  130 interrupted (nothing written)"""


@offline(TRANSFORMERS_VERBOSITY="error")  # set for the run only: main() may be called in a user's process
def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    out: OutDir | None = None
    previous = os.environ.get("PARITY_TIMEOUT")
    try:
        if args.timeout is not None:
            if not args.timeout >= 0 or args.timeout == float("inf"):
                raise ParityInputError(f"--timeout {args.timeout!r} is not a number of seconds >= 0; give e.g. 600, "
                                       "or 0 for no limit")
            os.environ["PARITY_TIMEOUT"] = repr(args.timeout)  # read by every phase, here and in child processes
        check_trace_options(args, p)
        check_blank(args)
        check_unique(args)
        req = build_request(args)
        if args.taps:
            from parity.model.taps import select_taps, tap_order

            select_taps(tap_order(req.spec), args.taps)  # validate before running
        if args.waivers:  # read before any work: a malformed file is bad input
            from parity.gate.waivers import load_waivers

            waivers = load_waivers(args.waivers)
        out = OutDir(args.out).open()
        if args.save_traces:
            req.trace_dir = str(out.traces)
        from parity.harness import from_traces, run

        start = time.perf_counter()
        progress = None if args.quiet else _progress()
        if args.trace:
            from parity.capture.trace import load_trace

            report = from_traces([load_trace(p, lazy=True) for p in args.trace], req.reference, req.weights,
                                 req.tolerances, req.layers if args.layers != "all" else None, args.raw_logits)
        else:
            report = run(req, progress=progress)
        if args.waivers:
            from parity.gate.waivers import apply_waivers

            apply_waivers(report, waivers)
        if progress:
            progress.done()
        from parity.report.render import print_terminal

        print_terminal(report, verbose=args.verbose)
        write_report(report, out.staging, args.taps)
        if args.save_traces:
            from parity.capture.runner import trace_file

            for t in report.traces:
                f = trace_file(out.traces, t.impl, t.dtype, t.mode, t.prompt)
                if getattr(t.taps, "path", None) != f:  # captured in another process: already there
                    t.save(f)
            if report.held:  # quantized runs' references on their held weights, with what judging them needs
                from parity.compare.held import saved

                budgets = {q.label: q.budget for q in report.quant}
                for h in {id(h): h for h in report.held.values()}.values():
                    for t in saved(h, budgets):  # over a separate capture's own file too: written beside, renamed
                        t.save(trace_file(out.traces / h.folder, t.impl, t.dtype, t.mode, t.prompt))
        files = out.publish()
        print(f"wrote {', '.join(str(f) for f in files)} in {time.perf_counter() - start:.1f}s")
        return 0 if report.passed else 1
    except ParityInputError as e:
        print(f"parity: error: {e.render(cli_flag)}", file=sys.stderr)
        if out is not None:
            out.discard()
        return 2
    except KeyboardInterrupt:
        if out is not None:
            out.discard()
        print("parity: interrupted; nothing written", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 -- a crash (or a plug-in's sys.exit) is never a verdict
        import traceback

        full = no_space(e)
        if isinstance(e, ImplementationError):
            what = f"parity: implementation failed: {e}"
        elif full is not None:
            what = f"parity: no space left on device at {full}"
        elif isinstance(e, SystemExit):
            what = f"parity: implementation failed: something called sys.exit({e.code!r}) during the run"
        else:
            what = (f"parity: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    "; please report it")
        log = out.fail(getattr(e, "traceback", "") or traceback.format_exc()) if out is not None else None
        print(what + (f" (traceback: {log})" if log else ""), file=sys.stderr)
        return 3
    finally:
        if args.timeout is not None:  # main() may run inside a user's process: leave its environment as it was
            if previous is None:
                os.environ.pop("PARITY_TIMEOUT", None)
            else:
                os.environ["PARITY_TIMEOUT"] = previous


class _progress:
    """One transient status line on a terminal; plain lines to a log otherwise."""
    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def __call__(self, msg: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + msg)
            sys.stderr.flush()
        else:
            print(f"  .. {msg}", file=sys.stderr)

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
