"""The pytest plugin (entry point `pytest11: parity`): options, fixtures, collection, the summary.

One harness run per session (every implementation, every dtype, cumulative
and isolated); each test reads the part it checks, parametrised over
implementation and dtype so `-k hf`, `-k bfloat16`, `-k geglu` select. The
hooks only read options and call the session object
(`parity.suite.session.ParitySession`), which holds what they share.

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

Every option (and PARITY_THREADS, PARITY_TIMEOUT, PARITY_STREAM) is checked when pytest configures
(parity.suite.options): a bad value is one usage error naming the option, the value and the fix, exit
status 4 as for any bad pytest option, before a test runs. An implementation that fails (a plug-in factory
that raises or exits, a run that compares nothing) fails each test that needs it with one line.

Fixtures for your own parity tests:

    parity_spec      the session's GemmaSpec
    parity_weights   the session's Weights (`.tensors`: HF name -> array)
    parity_report    the session's Report, waivers applied (session scope; runs once)
    parity_trace     parity_trace(impl, dtype, prompt=None) -> Trace (the long prompt by default;
                     a prompt name, or a list of token ids)
    parity_baseline  parity_baseline(path=None, factor=2.0, floor=0.05) -> parity.gate.baseline.Gate
    parity_waivers   the waivers in force, for reports you build yourself (parity.gate.waivers.apply_waivers)
    parity_decode_report  a Report that also decodes --parity-decode steps through every implementation's cache

e.g.

    def test_my_port_gelu(parity_trace, parity_spec):
        from parity.gate.checks import check_gelu_tanh
        check_gelu_tanh(parity_trace("my_pkg.adapter:MyPort", "bfloat16"), parity_spec)

Waivers (parity/gate/waivers.py) are applied to the session report: a waived
diagnosis entry has severity "waived" (so `test_no_named_divergence` passes),
waived tap results are left out of the `results` fixture (so the tolerance
checks pass), and a failing probe check whose message names only waived
causes of its run is reported as xfail with the waiver's reason.
"""

from __future__ import annotations

import pytest

from parity.errors import ParityInputError
from parity.suite.session import (  # noqa: F401 -- plugin_flag and the defaults: their old home
    DEFAULT_BASELINE, DEFAULT_WAIVERS, PLUGIN_FLAGS, ParitySession, message, plugin_flag,
)

SESSION = pytest.StashKey[ParitySession]()


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


def _session(config) -> ParitySession:
    return config.stash[SESSION]


def pytest_configure(config):
    """Check the cheap inputs now, so a typo is one line (exit 4) before anything runs."""
    try:
        config.stash[SESSION] = ParitySession(config)
    except ParityInputError as e:
        raise pytest.UsageError(message(e)) from None


def pytest_generate_tests(metafunc):
    if "impl_dtype" in metafunc.fixturenames:
        params = _session(metafunc.config).params()
        metafunc.parametrize("impl_dtype", params, ids=[f"{n}-{d}" for n, d in params], scope="session")


@pytest.hookimpl(tryfirst=True)  # before the fixtures: a refused implementation builds nothing
def pytest_runtest_setup(item):
    """A default implementation collected but refused by its check (checked here, not at collection): skipped."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "impl_dtype" in callspec.params:
        why = _session(item.config).unrunnable(*callspec.params["impl_dtype"])
        if why:
            pytest.skip(why)


def pytest_collection_finish(session):
    err = _session(session.config).error
    if err:
        raise pytest.UsageError(err)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def parity_spec(request):
    """The session's GemmaSpec (--parity-checkpoint, else --parity-spec)."""
    return _session(request.config).inputs_or_fail()[0]


@pytest.fixture(scope="session")
def parity_weights(request):
    """The session's canonical Weights: `.tensors` maps HF names to float32 arrays."""
    return _session(request.config).inputs_or_fail()[1]


@pytest.fixture(scope="session")
def parity_waivers(request):
    """The waivers in force (--parity-waivers): apply them to a report you build yourself with
    `parity.gate.waivers.apply_waivers(report, parity_waivers)`."""
    return list(_session(request.config).waivers)


@pytest.fixture(scope="session")
def parity_report(request):
    """One harness run for the session (every implementation and dtype, both modes), waivers applied."""
    return _session(request.config).get_report()


@pytest.fixture(scope="session")
def parity_decode_report(request):
    """A Report that also decodes --parity-decode steps through every implementation's cache."""
    return _session(request.config).get_decode_report()


@pytest.fixture(scope="session")
def parity_trace(request):
    """A factory: parity_trace(impl, dtype, prompt=None) -> Trace, cumulative.

    `prompt` is None (the session's longest prompt), a prompt name ("short",
    "long") or a list of token ids. Reuses the session report's trace when
    the report has been built, else builds and runs that one implementation.
    """
    session, cache = _session(request.config), {}

    def trace(impl: str, dtype: str, prompt=None):
        return session.trace(impl, dtype, prompt, cache)

    return trace


@pytest.fixture
def parity_baseline(request):
    """A function: parity_baseline(path=None, factor=2.0, floor=0.05) -> parity.gate.baseline.Gate.

    Compares the session report with the baseline (--parity-baseline, or
    `path`), honouring --parity-update-baseline, writing the obtained file
    where it fails, and showing the outcome in the terminal summary.
    """
    from parity.gate.baseline import FACTOR, FLOOR

    session = _session(request.config)

    def check(path=None, factor: float = FACTOR, floor: float = FLOOR):
        return session.gate(path, factor, floor)

    return check


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
    from parity.gate.waivers import unwaived

    impl, dtype = impl_dtype
    out = {m: parity_report.run_results(impl, dtype, m) for m in ("cumulative", "isolated")}
    if not any(out.values()):
        pytest.fail(f"parity: the report has no results for {impl}@{dtype} (runs: "
                    f"{sorted({r.impl + '@' + r.dtype for r in parity_report.runs})})", pytrace=False)
    return {m: unwaived(rs) for m, rs in out.items()}


# ------------------------------------------------------------------------------------- waived checks
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if call.when != "call" or not rep.failed or call.excinfo is None \
            or not isinstance(call.excinfo.value, AssertionError):
        return rep
    callspec = getattr(item, "callspec", None)
    session = item.config.stash.get(SESSION, None)
    if callspec is None or "impl_dtype" not in callspec.params or session is None:
        return rep
    note = session.waived(*callspec.params["impl_dtype"], call.excinfo.value)
    if note:
        rep.outcome = "skipped"
        rep.wasxfail = f"waived: {note}"
    return rep


# ----------------------------------------------------------------------------------- end of session
def pytest_sessionfinish(session):
    s = session.config.stash.get(SESSION, None)
    if s is not None:
        s.finish(getattr(session.config, "workeroutput", None))  # an xdist worker: the controller prints it


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    session = node.config.stash.get(SESSION, None)
    out = getattr(node, "workeroutput", {}).get("parity_summary")
    if session is not None and out:
        session.from_workers.append(out)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = config.stash.get(SESSION, None)
    lines = session.terminal_lines() if session is not None else []
    if lines:
        terminalreporter.section("parity")
    for line, yellow in lines:
        terminalreporter.write_line(line, **({"yellow": True} if yellow else {}))
