"""`parity.trace` moved to `parity.capture.trace`; this path keeps users' imports working."""

from parity.capture.trace import *  # noqa: F401,F403
from parity.capture.trace import __dict__ as _moved

globals().update({k: v for k, v in _moved.items() if not k.startswith('__')})
