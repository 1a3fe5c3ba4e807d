"""The pytest plugin (entry point `pytest11: parity`): options, fixtures, waivers, the baseline gate, the summary.

One harness run per session (every implementation, every dtype, cumulative
and isolated); each test reads the part it checks, parametrised over
implementation and dtype so `-k hf`, `-k bfloat16`, `-k geglu` select.

Options (all under `--parity-`):

    --parity-impls a,b          implementations (default: every installed built-in)
    --parity-dtypes a,b         dtypes (default float32,bfloat16)
    --parity-spec P             preset or config.json (default tiny-gemma)
    --parity-checkpoint DIR     a local checkpoint directory: gives the spec and the weights
    --parity-report-dir DIR     write report.json, report.md (and report.html) there at the end
    --parity-baseline FILE      the baseline the gate compares with (default fixtures/baseline.json)
    --parity-update-baseline    rewrite the baseline from this session (the gate then fails once)
    --parity-waivers FILE       accepted divergences (default fixtures/waivers.toml, if it exists)
    --parity-decode N|auto      decode steps of the decode checks (default auto: past every sliding window)

Fixtures for your own parity tests:

    parity_spec      the session's GemmaSpec
    parity_weights   the session's Weights (`.tensors`: HF name -> array)
    parity_report    the session's Report, waivers applied (session scope; runs once)
    parity_trace     parity_trace(impl, dtype, prompt=None) -> Trace (the long prompt by default;
                     a prompt name, or a list of token ids)
    parity_baseline  parity_baseline(path=None, factor=2.0, floor=0.05) -> parity.baseline.Gate
    parity_waivers   the waivers in force, for reports you build yourself (parity.waivers.apply_waivers)
    parity_decode_report  a Report that also decodes --parity-decode steps through every implementation's cache

e.g.

    def test_my_port_gelu(parity_trace, parity_spec):
        from parity.checks import check_gelu_tanh
        check_gelu_tanh(parity_trace("my_pkg.adapter:MyPort", "bfloat16"), parity_spec)

Waivers (parity/waivers.py) are applied to the session report: a waived
diagnosis entry has severity "waived" (so `test_no_named_divergence` passes),
waived tap results are left out of the `results` fixture (so the tolerance
checks pass), and a failing probe check whose message names only waived
causes of its run is reported as xfail with the waiver's reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEFAULT_BASELINE = "fixtures/baseline.json"
DEFAULT_WAIVERS = "fixtures/waivers.toml"


@dataclass
class _State:
    baseline_path: Path
    update_baseline: bool
    waivers_path: Path | None
    waivers: list = field(default_factory=list)
    report_dir: Path | None = None
    tolerances: dict | None = None
    inputs: tuple | None = None  # (spec, weights)
    params: list | None = None  # [(impl name, dtype)] for impl_dtype
    error: str | None = None  # bad input found during collection: raised as a UsageError when it ends
    report: object = None
    decode_report: object = None  # the decode checks' report (parity_decode_report), built when first asked
    applied: object = None  # parity.waivers.Applied
    gates: list = field(default_factory=list)  # parity.baseline.Gate, one per parity_baseline call
    written: list = field(default_factory=list)
    from_workers: list = field(default_factory=list)  # summaries sent by xdist workers


_STATE = pytest.StashKey[_State]()


PLUGIN_FLAGS = {"out": "--parity-report-dir", "impls": "--parity-impls", "dtypes": "--parity-dtypes",
                "spec": "--parity-spec", "weights_profile": "--parity-weights-profile", "decode": "--parity-decode"}


def plugin_flag(option: str) -> str:
    """How the plugin spells a field in its messages: its own option where it has one, else the field."""
    return PLUGIN_FLAGS.get(option, option)


def pytest_addoption(parser):
    g = parser.getgroup("parity", "parity: layer-by-layer numerical parity of Gemma implementations")
    g.addoption("--parity-impls", default=None, help="comma-separated implementations (default: every installed)")
    g.addoption("--parity-dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    g.addoption("--parity-spec", default=None, help="preset name or config.json (default tiny-gemma)")
    g.addoption("--parity-checkpoint", default=None, metavar="DIR",
                help="a local checkpoint directory (HuggingFace, keras-hub preset or litgpt): gives the spec and "
                     "the weights, instead of --parity-spec and seeded random weights")
    g.addoption("--parity-weights-profile", default="default", choices=("default", "trained-like"),
                help="statistics of the seeded random weights (default, or trained-like: heavy-tailed norm "
                     "weights, a massive BOS activation, an attention sink)")
    g.addoption("--parity-report-dir", default=None, metavar="DIR",
                help="write report.json and report.md (and report.html) there at the end of the session")
    g.addoption("--parity-baseline", default=None, metavar="FILE",
                help=f"baseline for test_baseline_gate (default {DEFAULT_BASELINE} under the rootdir)")
    g.addoption("--parity-update-baseline", action="store_true", default=False,
                help="rewrite the baseline from this session; the gate fails that run so the change is reviewed")
    g.addoption("--parity-decode", default="auto", metavar="N|auto",
                help="decode steps of the decode checks (parity/test_decode.py; default auto: twice the longest "
                     "sliding window plus two)")
    g.addoption("--parity-waivers", default=None, metavar="FILE",
                help=f"TOML file of accepted divergences (default {DEFAULT_WAIVERS} under the rootdir, if it exists)")


def _split(s):
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def _state(config) -> _State:
    return config.stash[_STATE]


def _path(config, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else Path(config.invocation_params.dir) / p


def pytest_configure(config):
    """Check the cheap inputs now, so a typo is one line (exit 4) before anything runs."""
    from parity.errors import ParityInputError

    opt = config.getoption
    try:
        baseline = _path(config, opt("--parity-baseline")) if opt("--parity-baseline") else \
            Path(config.rootpath) / DEFAULT_BASELINE
        if opt("--parity-waivers"):
            waivers_path = _path(config, opt("--parity-waivers"))
        else:
            default = Path(config.rootpath) / DEFAULT_WAIVERS
            waivers_path = default if default.is_file() else None
        state = _State(baseline_path=baseline, update_baseline=bool(opt("--parity-update-baseline")),
                       waivers_path=waivers_path)
        config.stash[_STATE] = state
        if waivers_path is not None:
            from parity.waivers import load_waivers

            state.waivers = load_waivers(waivers_path, opt("--parity-waivers") or DEFAULT_WAIVERS)
        from parity.waivers import DTYPES

        for d in _split(opt("--parity-dtypes")) or []:
            if d not in DTYPES:
                raise ParityInputError(f"--parity-dtypes: unknown dtype {d!r}; use one of {', '.join(DTYPES)}")
        if not _split(opt("--parity-dtypes")):
            raise ParityInputError("--parity-dtypes is empty; use e.g. --parity-dtypes float32,bfloat16")
        ckpt = opt("--parity-checkpoint")
        if ckpt:
            if opt("--parity-spec"):
                raise ParityInputError("--parity-checkpoint gives the spec; drop --parity-spec")
            if not _path(config, ckpt).exists():
                raise ParityInputError(f"--parity-checkpoint {ckpt!r} does not exist; give a local checkpoint "
                                       "directory (HuggingFace, keras-hub preset or litgpt)")
        else:
            from parity.presets import resolve_spec

            resolve_spec(opt("--parity-spec"))
        if opt("--parity-report-dir"):
            from parity.report import check_out_dir

            try:
                state.report_dir = check_out_dir(str(_path(config, opt("--parity-report-dir"))))
            except ParityInputError as e:
                raise ParityInputError(e.render(plugin_flag)) from None
        pyproject = Path(config.rootpath) / "pyproject.toml"
        if pyproject.is_file():
            from parity.tolerances import load_overrides

            state.tolerances = load_overrides(pyproject)
    except ParityInputError as e:
        raise pytest.UsageError(f"parity: {e.render(plugin_flag)}") from None


def _inputs(config) -> tuple:
    """(spec, weights) of the session: from --parity-checkpoint, else --parity-spec and seeded random weights."""
    state = _state(config)
    if state.inputs is None:
        ckpt = config.getoption("--parity-checkpoint")
        if ckpt:
            try:
                from parity.checkpoints import load_checkpoint
            except ImportError:
                raise pytest.UsageError("parity: --parity-checkpoint needs parity.checkpoints, which this "
                                        "version of parity does not have; use --parity-spec") from None
            state.inputs = tuple(load_checkpoint(_path(config, ckpt)))
        else:
            from parity.presets import resolve_spec
            from parity.weights import random_weights

            spec = resolve_spec(config.getoption("--parity-spec"))
            state.inputs = (spec, random_weights(spec, 0, config.getoption("--parity-weights-profile")))
    return state.inputs


def _request(config):
    from parity.harness import Request

    spec, weights = _inputs(config)
    return Request(spec=spec, weights=weights, impls=_split(config.getoption("--parity-impls")),
                   dtypes=_split(config.getoption("--parity-dtypes")), mode="both",
                   tolerances=_state(config).tolerances)


def _params(config) -> list:
    """(implementation name as the report knows it, dtype) pairs: what impl_dtype is parametrised over."""
    state = _state(config)
    if state.params is None:
        from parity.harness import resolve_impls

        req = _request(config)
        impls, _ = resolve_impls(req)
        params = []
        for _, adapter in impls:
            for d in req.dtypes:
                p = (adapter.name, d)  # module:factory names run under the adapter's own name
                if p != tuple(req.reference) and p not in params:
                    params.append(p)
        state.params = params
    return state.params


def pytest_generate_tests(metafunc):
    if "impl_dtype" in metafunc.fixturenames:
        from parity.errors import ParityInputError

        state = _state(metafunc.config)
        try:
            params = _params(metafunc.config) if state.error is None else []
        except ParityInputError as e:
            state.error, params = f"parity: {e.render(plugin_flag)}", []  # raised once collection ends: one line, exit status 4
        metafunc.parametrize("impl_dtype", params, ids=[f"{n}-{d}" for n, d in params], scope="session")


def pytest_collection_finish(session):
    err = _state(session.config).error
    if err:
        raise pytest.UsageError(err)


# ------------------------------------------------------------------------------------------- fixtures
def _inputs_or_fail(config) -> tuple:
    from parity.errors import ParityInputError

    try:
        return _inputs(config)
    except ParityInputError as e:
        pytest.fail(f"parity: {e.render(plugin_flag)}", pytrace=False)


@pytest.fixture(scope="session")
def parity_spec(request):
    """The session's GemmaSpec (--parity-checkpoint, else --parity-spec)."""
    return _inputs_or_fail(request.config)[0]


@pytest.fixture(scope="session")
def parity_weights(request):
    """The session's canonical Weights: `.tensors` maps HF names to float32 arrays."""
    return _inputs_or_fail(request.config)[1]


@pytest.fixture(scope="session")
def parity_waivers(request):
    """The waivers in force (--parity-waivers): apply them to a report you build yourself with
    `parity.waivers.apply_waivers(report, parity_waivers)`."""
    return list(_state(request.config).waivers)


@pytest.fixture(scope="session")
def parity_report(request):
    """One harness run for the session (every implementation and dtype, both modes), waivers applied."""
    return _report(request.config)


def _report(config):
    state = _state(config)
    if state.report is None:
        from parity.errors import ParityInputError
        from parity.harness import run
        from parity.waivers import apply_waivers

        try:
            report = run(_request(config))  # _request reads the inputs: a bad checkpoint fails here too
        except ParityInputError as e:
            pytest.fail(f"parity: {e.render(plugin_flag)}", pytrace=False)
        state.applied = apply_waivers(report, state.waivers)
        state.report = report
    return state.report


@pytest.fixture(scope="session")
def parity_decode_report(request):
    """One harness run that decodes (--parity-decode steps after each prompt through every implementation's
    cache; cumulative prefill beside it), waivers applied."""
    config = request.config
    state = _state(config)
    if state.decode_report is None:
        import dataclasses

        from parity.errors import ParityInputError
        from parity.harness import run
        from parity.waivers import apply_waivers

        text = config.getoption("--parity-decode").strip()
        steps = "auto" if text == "auto" else int(text) if text.lstrip("-").isdigit() else text
        try:
            report = run(dataclasses.replace(_request(config), mode="cumulative", decode=steps))
        except ParityInputError as e:
            pytest.fail(f"parity: {e.render(plugin_flag)}", pytrace=False)
        apply_waivers(report, state.waivers)
        state.decode_report = report
    return state.decode_report


@pytest.fixture(scope="session")
def parity_trace(request):
    """A factory: parity_trace(impl, dtype, prompt=None) -> Trace, cumulative.

    `prompt` is None (the session's longest prompt), a prompt name ("short",
    "long") or a list of token ids. Reuses the session report's trace when
    the report has been built, else builds and runs that one implementation.
    """
    config = request.config
    cache: dict = {}

    def trace(impl: str, dtype: str, prompt=None):
        from parity.adapters import get_adapter
        from parity.capture import capture
        from parity.prompts import default_prompts, validate_tokens

        spec, weights = _inputs_or_fail(config)
        state = _state(config)
        prompts = state.report.prompts if state.report is not None else default_prompts(spec)
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
            if state.report is not None and list(state.report.prompts.get(name, [])) == list(tokens):
                try:
                    found = state.report.trace(adapter.name, dtype, name)
                except KeyError:
                    found = None
            if found is None and getattr(adapter, "needs_own_process", lambda: False)():
                from parity.capture import capture_in_subprocess  # keras on a second backend

                found = capture_in_subprocess(impl, spec, weights, dtype, {name: list(tokens)})[0]
            cache[key] = found or capture(adapter, spec, weights, dtype, {name: list(tokens)})[0]
        return cache[key]

    return trace


@pytest.fixture
def parity_baseline(request):
    """A function: parity_baseline(path=None, factor=2.0, floor=0.05) -> parity.baseline.Gate.

    Compares the session report with the baseline (--parity-baseline, or
    `path`), honouring --parity-update-baseline, writing the obtained file
    where it fails, and showing the outcome in the terminal summary.
    """
    from parity.baseline import FACTOR, FLOOR, gate

    config = request.config
    state = _state(config)

    def check(path=None, factor: float = FACTOR, floor: float = FLOOR):
        report = _report(config)
        p = _path(config, str(path)) if path is not None else state.baseline_path
        g = gate(report, p, update=state.update_baseline, factor=factor, floor=floor)
        g.path = _show(config, p)
        if g.written:
            g.written = _show(config, Path(g.written))
        state.gates.append(g)
        return g

    return check


def _show(config, p: Path) -> str:
    """A path as the user would type it: relative to where pytest was started, when inside it."""
    try:
        return str(Path(p).resolve().relative_to(Path(config.invocation_params.dir).resolve()))
    except ValueError:
        return str(p)


# the parity suite's own fixtures (parity/test_*.py)
@pytest.fixture(scope="session")
def spec(parity_spec):
    return parity_spec


@pytest.fixture(scope="session")
def weights(parity_weights):
    return parity_weights.tensors


@pytest.fixture
def traces(parity_report, impl_dtype):
    """This implementation's cumulative traces, one per prompt."""
    impl, dtype = impl_dtype
    return [parity_report.trace(impl, dtype, p) for p in parity_report.prompts]


@pytest.fixture
def results(parity_report, impl_dtype):
    """This implementation's tap results per mode, less the waived ones."""
    from parity.waivers import unwaived

    impl, dtype = impl_dtype
    out = {m: parity_report.run_results(impl, dtype, m) for m in ("cumulative", "isolated")}
    if not any(out.values()):
        pytest.fail(f"parity: the report has no results for {impl}@{dtype} (runs: "
                    f"{sorted({r['impl'] + '@' + r['dtype'] for r in parity_report.runs})})", pytrace=False)
    return {m: unwaived(rs) for m, rs in out.items()}


# ------------------------------------------------------------------------------------- waived checks
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if call.when != "call" or not rep.failed or call.excinfo is None \
            or not isinstance(call.excinfo.value, AssertionError):
        return rep
    callspec = getattr(item, "callspec", None)
    state = item.config.stash.get(_STATE, None)
    if callspec is None or "impl_dtype" not in callspec.params or state is None or state.report is None:
        return rep
    from parity.waivers import explains_failure

    impl, dtype = callspec.params["impl_dtype"]
    exc = call.excinfo.value
    note = explains_failure(state.report, impl, dtype, str(exc), getattr(exc, "causes", None))
    if note:
        rep.outcome = "skipped"
        rep.wasxfail = f"waived: {note}"
    return rep


# ----------------------------------------------------------------------------------- end of session
def pytest_sessionfinish(session):
    config = session.config
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    if state.report is not None and state.report_dir is not None:
        state.written = _write_report(state.report, state.report_dir)
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller prints the summary
        config.workeroutput["parity_summary"] = _summary(config, state)


def _write_report(report, out: Path) -> list[str]:
    """parity.report.write_report into a private folder, then moved: xdist workers never share a temp file."""
    import shutil
    import tempfile

    from parity.report import write_report

    tmp = Path(tempfile.mkdtemp(prefix=".parity-report-", dir=out))
    try:
        files = write_report(report, tmp)
        for f in files:
            os.replace(f, out / f.name)
        return [str(out / f.name) for f in files]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    state = node.config.stash.get(_STATE, None)
    out = getattr(node, "workeroutput", {}).get("parity_summary")
    if state is not None and out:
        state.from_workers.append(out)


def _summary(config, state) -> dict:
    """The summary as plain lines, in parts, so xdist workers can send it to the controller."""
    from parity.render import cause_text, worst_text
    from parity.verdict import decide

    out = {"runs": [], "waivers": [], "gates": [], "written": list(state.written)}
    report = state.report
    if report is not None:
        s = report.spec
        out["runs"].append(
            f"{s.name} (Gemma {s.family}, {s.num_layers} layers), weights {report.weights_hash} "
            f"({report.weights_source}), reference {report.reference}, prompts "
            + ", ".join(f"{k} ({len(v)} tokens)" for k, v in report.prompts.items()))
        rows = [("run", "mode", "taps ok", "worst tap", "first divergence", "cause", "verdict")]
        for rv in decide(report).runs:
            first_text = "-" if rv.first is None else rv.first.tap
            rows.append((rv.label, rv.mode, f"{rv.passed_taps}/{rv.taps}", worst_text(rv.worst), first_text,
                         cause_text(rv.causes), rv.status))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out["runs"] += ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
        for k, v in report.skipped.items():
            out["runs"].append(f"skipped {k}: {v}")
    if state.applied is not None:
        out["waivers"] = state.applied.lines()
    for g in state.gates:
        out["gates"] += g.message().splitlines()
    if state.update_baseline and not state.gates and report is not None:
        out["gates"].append("--parity-update-baseline was given but no baseline check ran (test_baseline_gate "
                            "deselected?): nothing was written")
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    parts = [_summary(config, state)] if state.report is not None or state.gates else []
    parts += state.from_workers
    if not parts:
        return
    runs = next((p["runs"] for p in parts if p["runs"]), [])
    waivers = next((p["waivers"] for p in parts if p["waivers"]), [])
    gates = [line for p in parts for line in p["gates"]]
    written = sorted({f for p in parts for f in p["written"]})
    if not (runs or gates):
        return
    tr = terminalreporter
    tr.section("parity")
    for line in runs:
        tr.write_line(line)
    for line in waivers:
        tr.write_line(line, yellow=True)
    for line in gates:
        tr.write_line(line)
    if written:
        tr.write_line("parity report: " + ", ".join(written))
