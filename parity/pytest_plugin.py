"""The pytest plugin (entry point `pytest11: parity`): options, fixtures, and the parity suite's set-up.

One harness run per session (every implementation, every dtype, cumulative
and isolated); each test reads the part it checks, parametrised over
implementation and dtype so `-k hf`, `-k bfloat16`, `-k geglu` select.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_addoption(parser):
    g = parser.getgroup("parity")
    g.addoption("--parity-impls", default=None, help="comma-separated implementations (default: every installed)")
    g.addoption("--parity-dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    g.addoption("--parity-spec", default=None, help="preset name or config.json (default tiny-gemma)")


def _split(s):
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def _request(config):
    from parity.harness import Request
    from parity.spec import resolve_spec

    return Request(spec=resolve_spec(config.getoption("--parity-spec")),
                   impls=_split(config.getoption("--parity-impls")),
                   dtypes=_split(config.getoption("--parity-dtypes")), mode="both")


def pytest_generate_tests(metafunc):
    if "impl_dtype" in metafunc.fixturenames:
        from parity.harness import resolve_impls

        req = _request(metafunc.config)
        impls, _ = resolve_impls(req)
        params = [(name, d) for name, _ in impls for d in req.dtypes if (name, d) != req.reference]
        metafunc.parametrize("impl_dtype", params, ids=[f"{n}-{d}" for n, d in params], scope="session")


@pytest.fixture(scope="session")
def parity_report(request):
    from parity.harness import run

    return run(_request(request.config))


@pytest.fixture(scope="session")
def spec(parity_report):
    return parity_report.spec


@pytest.fixture(scope="session")
def weights(parity_report):
    return parity_report.weights.tensors


@pytest.fixture
def traces(parity_report, impl_dtype):
    """This implementation's cumulative traces, one per prompt."""
    impl, dtype = impl_dtype
    return [parity_report.trace(impl, dtype, p) for p in parity_report.prompts]


@pytest.fixture
def results(parity_report, impl_dtype):
    impl, dtype = impl_dtype
    return {m: parity_report.run_results(impl, dtype, m) for m in ("cumulative", "isolated")}
