"""The parity plugin's session: what its hooks share, one object per pytest session.

Built from the `--parity-*` options when pytest configures (the cheap inputs
checked there, so a typo is one line before anything runs); it holds the
inputs, the one harness run and its waivers, the baseline gates, the written
report files and the summary the hooks print. As pytest-benchmark's
`BenchmarkSession` is to its plugin: the hooks in `parity.suite.plugin` only
call into it.

pytest loads the plugin in every session of every project where parity is
installed, so the numerical modules are imported only when first used.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from parity.adapters.declared import declared
from parity.errors import ParityInputError

DEFAULT_BASELINE = "fixtures/baseline.json"
DEFAULT_WAIVERS = "fixtures/waivers.toml"

# the library's field names, spelled as this plugin's options (pytest_plugin.pytest_addoption)
PLUGIN_FLAGS = {"out": "--parity-report-dir", "impls": "--parity-impls", "dtypes": "--parity-dtypes",
                "spec": "--parity-spec", "weights_profile": "--parity-weights-profile", "decode": "--parity-decode"}


def plugin_flag(option: str) -> str:
    """How the plugin spells a field in its messages: its own option where it has one, else the field."""
    return PLUGIN_FLAGS.get(option, option)


def message(e: ParityInputError) -> str:
    """A library error as the plugin shows it: one line, fields named by their --parity-* flags."""
    return f"parity: {e.render(plugin_flag)}"


def split(s):
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def _help(config) -> bool:
    """`pytest --help` / `--version`: configure runs, but nothing is read."""
    return bool(getattr(config.option, "help", False) or getattr(config.option, "version", False))


class ParitySession:
    """The options read and checked, and the state built from them on first use."""

    def __init__(self, config) -> None:
        """Check every option now; raises ParityInputError (the hook turns it into a usage error, exit 4)."""
        self.config = config
        self.waivers: list = []
        self.report_dir: Path | None = None
        self.tolerances: dict | None = None
        self._inputs: tuple | None = None  # (spec, weights)
        self._params: list | None = None  # [(impl name, dtype)] for impl_dtype
        self._checked: tuple | None = None  # resolve_impls' (impls, skipped), at the first set-up that needs it
        self.error: str | None = None  # bad input found during collection: raised as a UsageError when it ends
        self.failure: str | None = None  # an implementation that failed while collecting: every test fails with it
        self.report = None
        self.decode_report = None  # the decode checks' report, built when first asked for
        self.applied = None  # parity.gate.waivers.Applied
        self.gates: list = []  # parity.gate.baseline.Gate, one per parity_baseline call
        self.written: list = []
        self.from_workers: list = []  # summaries sent by xdist workers
        self._check_options()

    def _check_options(self) -> None:
        """Every --parity-* option and PARITY_* variable, checked before any test runs: a bad value is one
        usage error naming the option, the value and the fix, never N test errors or a failure at the end.

        Only cheap checks run here (files parsed, names looked up), except --parity-checkpoint, which is read
        whole: every test needs it, and a garbage directory must not become one failure per test.
        """
        from parity.suite.options import (check_decode, check_dtypes, check_environment, check_impls,
                                          check_path_option)

        config, opt = self.config, self.config.getoption
        for name in ("--parity-spec", "--parity-checkpoint", "--parity-report-dir", "--parity-baseline",
                     "--parity-waivers"):
            check_path_option(name, opt(name))
        self.dtypes = check_dtypes(opt("--parity-dtypes"))
        self.impls = check_impls(opt("--parity-impls"))
        self.decode = check_decode(opt("--parity-decode"))
        check_environment()
        self.update_baseline = bool(opt("--parity-update-baseline"))
        given = opt("--parity-baseline")
        self.baseline_path = self.path(given) if given is not None else Path(config.rootpath) / DEFAULT_BASELINE
        self._check_baseline(given is not None)
        if opt("--parity-waivers") is not None:
            self.waivers_path = self.path(opt("--parity-waivers"))
        else:
            default = Path(config.rootpath) / DEFAULT_WAIVERS
            self.waivers_path = default if default.is_file() else None
        if self.waivers_path is not None:
            from parity.gate.waivers import load_waivers

            self.waivers = load_waivers(self.waivers_path, opt("--parity-waivers") or DEFAULT_WAIVERS)
        ckpt = opt("--parity-checkpoint")
        if ckpt is not None:
            if opt("--parity-spec") is not None:
                raise ParityInputError("--parity-checkpoint gives the spec; drop --parity-spec")
            if not self.path(ckpt).exists():
                raise ParityInputError(f"--parity-checkpoint {ckpt!r} does not exist; give a local checkpoint "
                                       "directory (HuggingFace, keras-hub preset or litgpt)")
            if not _help(config):
                self.inputs()  # a directory of garbage, a pickle, NaN weights: refused now, once
        else:
            from parity.model.presets import resolve_spec

            resolve_spec(opt("--parity-spec"))
        if opt("--parity-report-dir") is not None:
            from parity.report.files import check_out_dir

            self.report_dir = check_out_dir(str(self.path(opt("--parity-report-dir"))))
        pyproject = Path(config.rootpath) / "pyproject.toml"
        if pyproject.is_file():
            from parity.numerics.tolerances import load_overrides

            self.tolerances = load_overrides(pyproject)

    def _check_baseline(self, given: bool) -> None:
        """A baseline that exists is read now (a malformed one is a usage error, not a failed gate at the end);
        a missing one is written as `.obtained.json` by the gate, as pytest-regressions does."""
        p = self.baseline_path
        if p.exists() and not p.is_file():
            raise ParityInputError(f"--parity-baseline {self.show(p)!r} is a directory; give a JSON file, e.g. "
                                   f"{DEFAULT_BASELINE}")
        if p.is_file() and not self.update_baseline:
            from parity.gate.baseline import load

            try:
                load(p)
            except ParityInputError as e:
                flag = "--parity-baseline " if given else ""
                raise ParityInputError(f"{flag}{e}") from None

    # ---------------------------------------------------------------------------------------- paths
    def path(self, value: str) -> Path:
        """An option's path, relative to where pytest was started."""
        p = Path(value)
        return p if p.is_absolute() else Path(self.config.invocation_params.dir) / p

    def show(self, p: Path) -> str:
        """A path as the user would type it: relative to where pytest was started, when inside it."""
        try:
            return str(Path(p).resolve().relative_to(Path(self.config.invocation_params.dir).resolve()))
        except ValueError:
            return str(p)

    # --------------------------------------------------------------------------------------- inputs
    def inputs(self) -> tuple:
        """(spec, weights) of the session: from --parity-checkpoint, else --parity-spec and seeded random weights."""
        if self._inputs is None:
            opt = self.config.getoption
            if opt("--parity-checkpoint"):
                try:
                    from parity.model.checkpoints import load_checkpoint
                except ImportError:
                    raise pytest.UsageError("parity: --parity-checkpoint needs parity.model.checkpoints, which this "
                                            "version of parity does not have; use --parity-spec") from None
                self._inputs = tuple(load_checkpoint(self.path(opt("--parity-checkpoint"))))
            else:
                from parity.model.presets import resolve_spec
                from parity.model.weights import random_weights

                spec = resolve_spec(opt("--parity-spec"))
                self._inputs = (spec, random_weights(spec, 0, opt("--parity-weights-profile")))
        return self._inputs

    def inputs_or_fail(self) -> tuple:
        try:
            return self.inputs()
        except ParityInputError as e:
            pytest.fail(message(e), pytrace=False)

    def _run(self, req):
        """The harness on `req`: bad input or a failed implementation is one line in each test that needs it
        (pytest.fail, no traceback: the implementation's traceback is in its ImplementationError), never a pass."""
        from parity.errors import ImplementationError
        from parity.harness import run

        if self.failure is not None:
            pytest.fail(self.failure, pytrace=False)
        try:
            return run(req)
        except ParityInputError as e:
            line = message(e)
        except ImplementationError as e:
            line = f"parity: implementation failed: {e}"
        except SystemExit as e:  # not through a phase: still never the session's exit status
            line = f"parity: implementation failed: something called sys.exit({e.code!r}) during the run"
        pytest.fail(line, pytrace=False)  # outside the except: one line, no "during handling of" chain

    def request(self):
        from parity.harness import Request

        spec, weights = self.inputs()
        return Request(spec=spec, weights=weights, impls=self.impls, dtypes=self.dtypes, mode="both",
                       tolerances=self.tolerances)

    def params(self) -> list:
        """(implementation name as the report knows it, dtype) pairs: what impl_dtype is parametrised over.

        Implementations named with --parity-impls are checked here: one that cannot run is a usage error before
        anything runs. The default (every built-in) is not checked at collection: a check imports its framework
        (keras brings TensorFlow, about 10 s) and collection stays cheap, so each installed default is
        parametrised and `unrunnable` skips, when its first test is set up, one whose check refuses it (a spec or
        dtype it cannot build, a library that fails to import), with the reason.
        A bad input is kept in `error` (raised once collection ends: one line, exit status 4), not raised here.
        """
        if self.error is not None:
            return []
        if self._params is None:
            from parity.adapters import default_impls, get_adapter, installed

            from parity.errors import ImplementationError

            try:
                sel = self.selection()
                if sel.impls is not None:
                    params = self._pairs(sel, self.checked()[0])
                else:  # by name: get_adapter imports parity's adapter module, not its framework; a default whose
                    # packages are not installed is left out, as its check would leave it out (found, not imported)
                    params = self._pairs(sel, [(n, get_adapter(n)) for n in default_impls() if installed(n)])
            except ParityInputError as e:
                self.error = message(e)
                return []
            except ImplementationError as e:
                # a plug-in whose factory raised or exited: its tests exist and fail with that line, never pass
                self.failure = f"parity: implementation failed: {e}"
                params = [(n, d) for n in self.impls or [] for d in self.dtypes]
            self._params = params
        return self._params

    @staticmethod
    def _pairs(sel, impls) -> list:
        params = []
        for _, adapter in impls:
            for d in sel.dtypes:
                p = (adapter.name, d)  # module:factory names run under the adapter's own name
                if p != tuple(sel.reference) and p not in params:
                    params.append(p)
        return params

    def selection(self):
        """What the session runs, less the weights (collection needs the spec only, not a weights build)."""
        from parity.capture.implementations import Selection
        from parity.harness import REFERENCE

        if self._inputs is not None or self.config.getoption("--parity-checkpoint"):
            spec = self.inputs()[0]  # a checkpoint's config and weights come together
        else:
            from parity.model.presets import resolve_spec

            spec = resolve_spec(self.config.getoption("--parity-spec"))
        return Selection(spec=spec, impls=self.impls, dtypes=self.dtypes, reference=REFERENCE)

    def checked(self) -> tuple:
        """parity.capture.implementations.resolve_impls on the session's selection, once: each implementation
        checked (its framework imported) against the spec in every dtype, and the defaults skipped, with why."""
        if self._checked is None:
            from parity.capture.implementations import resolve_impls

            self._checked = resolve_impls(self.selection())
        return self._checked

    def unrunnable(self, impl: str, dtype: str) -> str | None:
        """Why a collected (impl, dtype) cannot run here (a default whose check refuses it), else None."""
        if self.failure is not None:
            return None  # it runs, and fails each test with its one line (_run)
        try:
            impls, skipped = self.checked()
        except ParityInputError as e:
            pytest.fail(message(e), pytrace=False)
        if any(a.name == impl for _, a in impls):
            return None
        why = skipped.get(impl, "its check refused it")
        return f"parity: {impl}@{dtype} cannot run here, so it is not compared: {why}"

    # -------------------------------------------------------------------------------------- the run
    def get_report(self):
        """One harness run for the session (every implementation and dtype, both modes), waivers applied."""
        if self.report is None:
            from parity.gate.waivers import apply_waivers

            report = self._run(self.inputs_or_fail() and self.request())
            self.applied = apply_waivers(report, self.waivers)
            self.report = report
        return self.report

    def get_decode_report(self):
        """One harness run that decodes --parity-decode steps after each prompt through every implementation's
        cache (the cumulative prefill beside it), waivers applied."""
        if self.decode_report is None:
            import dataclasses

            from parity.gate.waivers import apply_waivers

            self.inputs_or_fail()
            report = self._run(dataclasses.replace(self.request(), mode="cumulative", decode=self.decode))
            apply_waivers(report, self.waivers)
            self.decode_report = report
        return self.decode_report

    def trace(self, impl: str, dtype: str, prompt, cache: dict):
        """The cumulative trace of one implementation (see the parity_trace fixture), kept in `cache`."""
        from parity.adapters import get_adapter
        from parity.capture.runner import capture
        from parity.model.prompts import default_prompts, validate_tokens

        spec, weights = self.inputs_or_fail()
        report = self.report
        prompts = report.prompts if report is not None else default_prompts(spec)
        if prompt is None:
            name = max(prompts, key=lambda k: len(prompts[k]))
            tokens = prompts[name]
        elif isinstance(prompt, str):
            if prompt not in prompts:
                raise KeyError(f"parity_trace: no prompt {prompt!r}; use one of {sorted(prompts)} or token ids")
            name, tokens = prompt, prompts[prompt]
        else:
            name, tokens = "tokens", validate_tokens("tokens", list(prompt), spec)
        key = (impl, dtype, name, tuple(tokens))
        if key not in cache:
            adapter = get_adapter(impl)
            found = None
            if report is not None and list(report.prompts.get(name, [])) == list(tokens):
                try:
                    found = report.trace(adapter.name, dtype, name)
                except KeyError:
                    found = None
            if found is None and declared(adapter).own_process:
                from parity.capture.runner import capture_in_subprocess  # keras on a second backend

                found = capture_in_subprocess(impl, spec, weights, dtype, {name: list(tokens)})[0]
            cache[key] = found or capture(adapter, spec, weights, dtype, {name: list(tokens)})[0]
        return cache[key]

    def gate(self, path, factor: float, floor: float):
        """The session report against a baseline (`path`, else --parity-baseline), kept for the summary."""
        from parity.gate.baseline import gate

        report = self.get_report()
        p = self.path(str(path)) if path is not None else self.baseline_path
        g = gate(report, p, update=self.update_baseline, factor=factor, floor=floor)
        g.path = self.show(p)
        if g.written:
            g.written = self.show(Path(g.written))
        self.gates.append(g)
        return g

    def waived(self, impl: str, dtype: str, exc: AssertionError) -> str | None:
        """The waivers' note when a failed check names only waived causes of its run, else None."""
        if self.report is None:
            return None
        from parity.gate.waivers import explains_failure

        return explains_failure(self.report, impl, dtype, str(exc), getattr(exc, "causes", None))

    # ------------------------------------------------------------------------------ end of session
    def finish(self, worker_output: dict | None) -> None:
        """Write the report files; on an xdist worker, hand the summary to the controller."""
        if self.report is not None and self.report_dir is not None:
            self.written = _write_report(self.report, self.report_dir)
        if worker_output is not None:
            worker_output["parity_summary"] = self.summary()

    def summary(self) -> dict:
        """The summary as plain lines, in parts, so xdist workers can send it to the controller."""
        from parity.report.summary import header, run_rows

        out = {"runs": [], "waivers": [], "gates": [], "written": list(self.written)}
        report = self.report
        if report is not None:
            s = report.spec
            out["runs"].append(
                f"{s.name} (Gemma {s.family}, {s.num_layers} layers), weights {report.weights_hash} "
                f"({report.weights_source}), reference {report.reference}, prompts "
                + ", ".join(f"{k} ({len(v)} tokens)" for k, v in report.prompts.items()))
            rows = [header()] + [row.cells() for row in run_rows(report)]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            out["runs"] += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
            for k, v in report.skipped.items():
                out["runs"].append(f"skipped {k}: {v}")
        if self.applied is not None:
            out["waivers"] = self.applied.lines()
        for g in self.gates:
            out["gates"] += g.message().splitlines()
        if self.update_baseline and not self.gates and report is not None:
            out["gates"].append("--parity-update-baseline was given but no baseline check ran (test_baseline_gate "
                                "deselected?): nothing was written")
        return out

    def terminal_lines(self) -> list[tuple[str, bool]]:
        """(line, in yellow) for the terminal summary: this process's part and the xdist workers' merged."""
        parts = [self.summary()] if self.report is not None or self.gates else []
        parts += self.from_workers
        if not parts:
            return []
        runs = next((p["runs"] for p in parts if p["runs"]), [])
        waivers = next((p["waivers"] for p in parts if p["waivers"]), [])
        gates = [line for p in parts for line in p["gates"]]
        written = sorted({f for p in parts for f in p["written"]})
        if not (runs or gates):
            return []
        lines = [(line, False) for line in runs] + [(line, True) for line in waivers]
        lines += [(line, False) for line in gates]
        if written:
            lines.append(("parity report: " + ", ".join(written), False))
        return lines


def _write_report(report, out: Path) -> list[str]:
    """parity.report.cli.write_report into a private folder, then moved: xdist workers never share a temp file."""
    import shutil
    import tempfile

    from parity.report.files import write_report

    tmp = Path(tempfile.mkdtemp(prefix=".parity-report-", dir=out))
    try:
        files = write_report(report, tmp)
        for f in files:
            os.replace(f, out / f.name)
        return [str(out / f.name) for f in files]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
