"""`parity.spec` moved to `parity.model.spec`; this path keeps users' imports working."""

from parity.model.spec import *  # noqa: F401,F403
from parity.model.spec import __dict__ as _moved

globals().update({k: v for k, v in _moved.items() if not k.startswith('__')})
