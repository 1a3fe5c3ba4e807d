"""The project's port of Gemma, by its old name.

The model itself is `parity.adapters.port_model` (frameworks are imported only
under `parity/adapters/`); every name it defines is importable from here too.
"""

from parity.adapters.port_model import *  # noqa: F401,F403
from parity.adapters.port_model import PortOptions, _compute_dtype  # noqa: F401 -- named for readers and tools
