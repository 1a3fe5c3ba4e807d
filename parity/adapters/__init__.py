"""Adapters: one module (or folder) per implementation, and the registry that names them.

parity.adapters.registry holds the table of built-ins (one line each) and resolves a name, an entry
point (`parity.adapters` group) or `module:factory` to an adapter, importing only what is named.
"""

from parity.adapters.registry import (
    BUILTINS,
    DEFAULT_IMPLS,
    Builtin,
    backend_missing,
    default_impls,
    frameworks,
    get_adapter,
    installed,
    known_names,
    listing,
)

__all__ = ["BUILTINS", "DEFAULT_IMPLS", "Builtin", "backend_missing", "default_impls", "frameworks", "get_adapter",
           "installed", "known_names",
           "listing"]
