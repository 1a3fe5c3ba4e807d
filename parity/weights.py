"""`parity.weights` moved to `parity.model.weights`; this path keeps users' imports working."""

from parity.model.weights import *  # noqa: F401,F403
from parity.model.weights import __dict__ as _moved

globals().update({k: v for k, v in _moved.items() if not k.startswith('__')})
