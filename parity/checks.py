"""`parity.checks` moved to `parity.gate.checks`; this path keeps users' imports working."""

from parity.gate.checks import *  # noqa: F401,F403
from parity.gate.checks import __dict__ as _moved

globals().update({k: v for k, v in _moved.items() if not k.startswith('__')})
