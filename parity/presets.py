"""`parity.presets` moved to `parity.model.presets`; this path keeps users' imports working."""

from parity.model.presets import *  # noqa: F401,F403
from parity.model.presets import __dict__ as _moved

globals().update({k: v for k, v in _moved.items() if not k.startswith('__')})
