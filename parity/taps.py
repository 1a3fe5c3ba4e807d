"""`parity.taps` moved to `parity.model.taps`; this path keeps users' imports working."""

from parity.model.taps import *  # noqa: F401,F403
from parity.model.taps import __dict__ as _moved

globals().update({k: v for k, v in _moved.items() if not k.startswith('__')})
