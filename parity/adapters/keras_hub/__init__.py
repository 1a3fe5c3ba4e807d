"""keras-hub's Gemma, as one adapter in four modules by job:

- adapter.py: `KerasAdapter` (check, build, run, decode, effective, release) and its tap and feed maps;
- recording.py: `Recorder`, the taps recorded (and arrays fed) while keras runs its own forward pass;
- readback.py: what the built model computes, read off its layers (`effective`, `differences`);
- keras-hub's format, names, layouts and options both ways, lives without keras in parity.formats.keras_hub.

The registry (parity.adapters.registry.BUILTINS) and users import `parity.adapters.keras_hub.KerasAdapter`; the
format's names stay importable from here too.
"""

from parity.adapters.keras_hub.adapter import (
    BACKENDS,
    DEFAULT_BACKEND,
    FEED_MAP,
    TAP_MAP,
    KerasAdapter,
    KerasModel,
)
from parity.formats.keras_hub import NAME_MAP, NAME_MAP_SANDWICH, QK_NORM_MAP, name_map, to_keras_layout
from parity.formats.keras_hub import to_layout as keras_layout

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "FEED_MAP", "NAME_MAP", "NAME_MAP_SANDWICH", "QK_NORM_MAP", "TAP_MAP",
           "KerasAdapter", "KerasModel", "keras_layout", "name_map", "to_keras_layout"]
