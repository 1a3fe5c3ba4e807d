"""The plugin's option values, checked one by one before any test runs (parity.suite.session calls these).

Each check raises ParityInputError naming the option, the value and the fix; the plugin turns it into
pytest's usage error (exit status 4, the one pytest gives a bad command-line option). Nothing here
imports a framework or builds anything.
"""

from __future__ import annotations

import re

from parity.errors import ParityInputError

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # module.path:factory


def listed(option: str, value: str | None, example: str) -> list[str] | None:
    """A comma-separated option: None when not given; empty, blank or repeated entries refused."""
    if value is None:
        return None
    items = [x.strip() for x in value.split(",")]
    if not any(items):
        raise ParityInputError(f"{option} is empty; give e.g. {option} {example}, or leave it out for the default")
    if not all(items):
        raise ParityInputError(f"{option} {value!r} has an empty entry; give e.g. {option} {example}")
    twice = sorted({v for v in items if items.count(v) > 1})
    if twice:  # two runs of one name would be pooled into one verdict
        raise ParityInputError(f"{option} lists {twice[0]!r} more than once; list each once")
    return items


def check_dtypes(value: str | None) -> list[str]:
    from parity.adapters.base import DTYPES

    items = listed("--parity-dtypes", value, "float32,bfloat16") or []
    for d in items:
        if d not in DTYPES:
            raise ParityInputError(f"--parity-dtypes: unknown dtype {d!r}; use one of {', '.join(DTYPES)}")
    return items


def check_impls(value: str | None) -> list[str] | None:
    """Built-in and entry-point names looked up now; `module:factory` checked for its form here and imported
    at collection (a plug-in module may be slow or fail: that is the implementation's failure, exit 3)."""
    from parity.adapters.registry import known_names

    items = listed("--parity-impls", value, "litgpt-style,hf")
    known = known_names()
    for name in items or []:
        if ":" in name:
            if not _FACTORY.match(name):
                raise ParityInputError(f"--parity-impls {name!r} is not module:factory (e.g. my_pkg.adapters:make); "
                                       "give an importable module and the name of a function in it")
        elif name not in known:
            raise ParityInputError(f"--parity-impls: unknown implementation {name!r}; use one of {', '.join(known)} "
                                   "or module:factory")
    return items


def check_decode(value: str):
    from parity.capture.decode import parse_steps

    return parse_steps(str(value))  # N >= 0 or auto; its message names {option}: the plugin names its flag


def check_path_option(option: str, value: str | None) -> None:
    """A path option given as '' (or blanks) would silently mean the default or the current directory."""
    if value is not None and not value.strip():
        raise ParityInputError(f"{option} is empty; give a path, or leave the option out for the default")


def check_environment() -> None:
    """The PARITY_* variables a run reads, checked now rather than in every test's setup."""
    from parity.adapters.torch_setup import threads
    from parity.errors import phase_timeout

    threads()
    phase_timeout()
    import os

    how = os.environ.get("PARITY_STREAM", "auto")
    if how not in ("auto", "always", "never"):
        raise ParityInputError(f"PARITY_STREAM={how!r}; use auto, always or never")
