"""Plug-ins that break while building or running, loadable with `--impls tests.broken_adapters:<name>`.

Each wraps the real port and fails in one phase, as a third-party adapter can:
the harness must say which implementation failed, in which phase, and exit 3,
never read the crash as a divergence (exit 1).
"""

import os

from parity.adapters.litgpt_style import LitgptStyleAdapter


class _Failing(LitgptStyleAdapter):
    phase = ""

    def __init__(self) -> None:
        super().__init__(name=f"fails-in-{self.phase}")

    def build(self, spec, weights, dtype):
        if self.phase == "build":
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().build(spec, weights, dtype)

    def run(self, model, tokens, feed=None):
        if self.phase == "run":
            raise KeyError("model.layers.0.mlp")
        return super().run(model, tokens, feed)


class FailsInBuild(_Failing):
    phase = "build"


class FailsInRun(_Failing):
    phase = "run"


def fails_in_build():
    return FailsInBuild()


def fails_in_run():
    return FailsInRun()


def factory_raises():
    raise ImportError("my_port needs flash-attn (simulated)")


class _NoCheck:
    name = "no-check"

    def version(self):
        return "0"

    def build(self, spec, weights, dtype):
        return None

    def run(self, model, tokens, feed=None):
        return None


def no_check():
    return _NoCheck()


class _CheckRaises(LitgptStyleAdapter):
    def __init__(self) -> None:
        super().__init__(name="check-raises")

    def check(self, spec, dtype):
        raise AttributeError("'NoneType' object has no attribute 'family' (simulated)")


def check_raises():
    return _CheckRaises()


class _KilledInBuild(LitgptStyleAdapter):
    """Dies as an out-of-memory kill does: SIGKILL, no exception, no output."""

    def __init__(self) -> None:
        super().__init__(name="killed-in-build")

    def build(self, spec, weights, dtype):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def killed_in_build():
    return _KilledInBuild()


# ------------------------------------------------------------------ hostile plug-ins (issue 18)
def exits_in_factory():
    """A factory that ends the process: the report must not end with its exit status."""
    import sys

    sys.exit(0)


class _ExitsInBuild(LitgptStyleAdapter):
    def __init__(self) -> None:
        super().__init__(name="exits-in-build")

    def build(self, spec, weights, dtype):
        import sys

        sys.exit(0)


def exits_in_build():
    return _ExitsInBuild()


HANG_S = 300  # how long it hangs: past any timeout a test sets, short of hanging a CI job if a signal is lost


class _SleepsInRun(LitgptStyleAdapter):
    """Hangs as a deadlocked kernel or a stuck download would."""

    def __init__(self) -> None:
        super().__init__(name="sleeps-in-run")

    def run(self, model, tokens, feed=None):
        import time

        started = os.environ.get("PARITY_TEST_RUN_STARTED")  # a file the interrupt test waits for
        if started:
            open(started, "w").close()
        time.sleep(HANG_S)
        raise RuntimeError(f"sleeps-in-run hung {HANG_S} s and was not stopped")


def sleeps_in_run():
    return _SleepsInRun()


class _GivesNothing(LitgptStyleAdapter):
    """Declares every tap unavailable: nothing to compare, which must never read as a PASS."""

    def __init__(self) -> None:
        super().__init__(name="gives-nothing")

    def run(self, model, tokens, feed=None):
        got = super().run(model, tokens, feed)
        return type(got)(taps={}, unavailable={k: "not exposed (simulated)" for k in got.taps})


def gives_nothing():
    return _GivesNothing()


class _EvilName(LitgptStyleAdapter):
    def __init__(self) -> None:
        super().__init__(name="../../evil/name")


def evil_name():
    return _EvilName()
