"""Old import paths kept for a while: each name read through one warns, names its new home and the version
that removes it, and is the very object of the module it moved to.

Only the paths the README once taught stay (`from parity.taps import expand_tap_map`, `from parity.weights
import map_weights`); the other old top-level paths were imported by nothing and are gone. A name set or
deleted through an old path (a monkeypatch) goes to the new module too, so it patches what parity calls.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

REMOVE_IN = "0.3.0"
MOVED = {"parity.weights": "parity.model.weights", "parity.taps": "parity.model.taps"}  # old path -> new path


class _Moved(types.ModuleType):
    @property
    def __dict__(self):
        """The new module's namespace: what a patching tool reads to restore a name (pytest's monkeypatch reads
        `target.__dict__`; with the shim's own, empty one its undo would delete the name from the new module)."""
        return vars(importlib.import_module(MOVED[self.__name__]))

    def _new(self, name: str):
        new = MOVED[self.__name__]
        # stacklevel 3: the user's line, past this method and the attribute hook that called it
        warnings.warn(f"{self.__name__} moved to {new} and goes in {REMOVE_IN}; import {name} from {new}",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def __getattr__(self, name: str):
        if name.startswith("__") and name != "__all__":  # tools probing dunders (__path__, __wrapped__): no warning
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        new = self._new(name)
        if name == "__all__":  # `from parity.taps import *`: the new module's public names
            return getattr(new, "__all__", [n for n in vars(new) if not n.startswith("_")])
        return getattr(new, name)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("__"):
            super().__setattr__(name, value)
        else:
            setattr(self._new(name), name, value)

    def __delattr__(self, name: str) -> None:
        if name.startswith("__"):
            super().__delattr__(name)
        else:
            delattr(self._new(name), name)


def moved(old: str) -> None:
    """Make module `old` (called from its own body: `moved(__name__)`) an alias of its entry in MOVED."""
    module = sys.modules[old]
    for name in [n for n in vars(module) if not n.startswith("__")]:
        del vars(module)[name]  # the shim's own imports: every name is the new module's
    module.__class__ = _Moved
