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


class phase:
    """Turn an adapter's exception into ImplementationError (exit 3), naming the phase; bad input stays bad input."""

    def __init__(self, impl: str, dtype: str, phase: str) -> None:
        self.impl, self.dtype, self.phase = impl, dtype, phase

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (ParityInputError, ImplementationError, KeyboardInterrupt)):
            return False
        import traceback

        text = "".join(traceback.format_exception(kind, exc, tb))
        raise ImplementationError(f"{self.impl}@{self.dtype}", self.phase, f"{kind.__name__}: {exc}".splitlines()[0],
                                  "the traceback is in the log; fix the adapter or report it upstream",
                                  traceback=text) from exc
