"""The one error type that means "the user's input is wrong" (exit status 2).

Every message is one line that names the value, the limit and the fix, so the
CLI can print it as it is and a CI log shows the whole problem.
"""


class ParityInputError(ValueError):
    """Bad input: a spec, checkpoint, token, layer, tap, dtype, path or backend."""

    exit_code = 2


class BackendMissing(ParityInputError):
    """An optional implementation's library is not installed."""


class Unsupported(ParityInputError):
    """The implementation cannot express this spec or dtype: an error when asked for by name,
    a skip (said in the report) when it is only one of the default implementations."""
