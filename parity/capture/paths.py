"""Names on disk: every file parity writes under a folder goes through `inside`, which keeps it there.

Implementation names come from plug-ins and prompt names from users; neither may choose where a file lands.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from parity.errors import ParityInputError

_SAFE = re.compile(r"[^A-Za-z0-9@+=,._-]")


def safe_name(text: str) -> str:
    """A file name made of `text` that stays one path component: separators and other characters outside a
    small safe set become `_`, and a leading dot (`..`, hidden files) is escaped."""
    name = _SAFE.sub("_", text) or "_"
    return "_" + name if name.startswith(".") else name


def inside(folder: Path, *parts: str) -> Path:
    """`folder/part/...` with each part made safe; refuses (never writes) a path that would leave the folder."""
    p = Path(folder).joinpath(*(safe_name(x) for x in parts))
    if Path(os.path.commonpath([p.resolve(), Path(folder).resolve()])) != Path(folder).resolve():
        raise ParityInputError(f"{'/'.join(parts)!r} would be written outside {folder}; rename it")
    return p
