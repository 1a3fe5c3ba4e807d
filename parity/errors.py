"""The one error type that means "the user's input is wrong" (exit status 2).

Every message is one line that names the value, the limit and the fix, so the
CLI can print it as it is and a CI log shows the whole problem.
"""


class ParityInputError(ValueError):
    """Bad input: a spec, checkpoint, token, layer, tap, dtype, path or backend.

    The library speaks in field names (`Request.mode`), the command lines in
    flags (`--mode`, `--parity-report-dir`): a message about one field holds
    `{option}` where the name goes and says which field (`option="mode"`);
    `str()` names the field, `render(flag)` lets each front end name its flag.
    """

    exit_code = 2

    def __init__(self, message: str, option: str | None = None) -> None:
        self.template, self.option = message, option
        super().__init__(self.render())

    def render(self, flag=None) -> str:
        """The message with the field named as `flag(option)` says (default: the field name itself)."""
        if self.option is None:
            return self.template
        return self.template.replace("{option}", flag(self.option) if flag else self.option)


def cli_flag(option: str) -> str:
    """The command lines' spelling of a field: `first_layers` -> `--first-layers`."""
    return "--" + option.replace("_", "-")


class BackendMissing(ParityInputError):
    """An optional implementation's library is not installed."""


class Unsupported(ParityInputError):
    """The implementation cannot express this spec or dtype: an error when asked for by name,
    a skip (said in the report) when it is only one of the default implementations."""


class ImplementationError(RuntimeError):
    """An implementation failed to build or run (exit status 3): not a verdict about its numbers.

    One line names the implementation, the phase and the error; the traceback,
    where there is one, goes to a log file rather than the terminal.
    """

    exit_code = 3

    def __init__(self, impl: str, phase: str, error: str, fix: str = "", traceback: str = "") -> None:
        self.impl, self.phase, self.error, self.fix, self.traceback = impl, phase, error, fix, traceback
        super().__init__(f"{impl} failed in {phase}: {error}" + (f"; {fix}" if fix else ""))


DEFAULT_TIMEOUT = 1800.0  # seconds per phase: a Gemma-2-27B-shaped build in bfloat16 takes minutes, not half an hour


def phase_timeout() -> float | None:
    """Seconds one phase (build, run, decode) may take before it is stopped (exit 3 naming the phase):
    PARITY_TIMEOUT, else DEFAULT_TIMEOUT; 0 turns the limit off. Read at each phase, so the child processes
    inherit the parent's limit through the environment."""
    import os

    text = os.environ.get("PARITY_TIMEOUT", "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ParityInputError(f"PARITY_TIMEOUT={text!r} is not a number of seconds >= 0; give e.g. 600, "
                               "or 0 for no limit")
    return value or None


class PhaseTimeout(Exception):
    """Raised inside a phase whose time is up (SIGALRM): a hung plug-in stops instead of hanging the run."""


class phase:
    """Turn an adapter's exception into ImplementationError (exit 3), naming the phase; bad input stays bad input.

    In the main thread the phase also runs under a timer (phase_timeout()): an adapter that sleeps or spins
    in Python is stopped when it is up. Only the outermost phase arms it.
    """

    _armed = False

    def __init__(self, impl: str, dtype: str, phase: str) -> None:
        self.impl, self.dtype, self.phase = impl, dtype, phase
        self._previous = None

    def __enter__(self):
        import signal
        import threading

        limit = phase_timeout()
        if limit and not phase._armed and threading.current_thread() is threading.main_thread() \
                and hasattr(signal, "setitimer"):
            def up(signum, frame):
                raise PhaseTimeout(f"no result after {limit:g}s")

            self._previous = signal.signal(signal.SIGALRM, up)
            signal.setitimer(signal.ITIMER_REAL, limit)
            phase._armed, self.limit = True, limit
        return self

    def _disarm(self) -> None:
        import signal

        if self._previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self._previous, phase._armed = None, False

    def __exit__(self, kind, exc, tb):
        self._disarm()
        if isinstance(exc, PhaseTimeout):
            raise ImplementationError(f"{self.impl}@{self.dtype}", self.phase, f"timed out: {exc}",
                                      "raise the limit with --timeout SECONDS (or PARITY_TIMEOUT; 0: none) "
                                      "if it is only slow") from None
        if exc is None or isinstance(exc, (ParityInputError, ImplementationError, KeyboardInterrupt)):
            return False
        if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC: the disk, not the implementation
            return False
        if isinstance(exc, SystemExit):
            # a plug-in that exits the process must not end the report with its exit code
            raise ImplementationError(f"{self.impl}@{self.dtype}", self.phase,
                                      f"it called sys.exit({exc.code!r})", "an adapter must return or raise, "
                                      "never exit the process") from None
        import traceback

        text = "".join(traceback.format_exception(kind, exc, tb))
        raise ImplementationError(f"{self.impl}@{self.dtype}", self.phase, f"{kind.__name__}: {exc}".splitlines()[0],
                                  "the traceback is in the log; fix the adapter or report it upstream",
                                  traceback=text) from exc
