"""Adapter registry: implementation name -> adapter factory, resolved lazily.

Built-ins are listed by import path so that naming one does not import the
others' frameworks. Users add their own with the `parity.adapters` entry point
group or `--impls module:factory`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from parity.errors import ImplementationError, ParityInputError

BUILTIN = {
    "litgpt-style": ("parity.adapters.litgpt_style", "LitgptStyleAdapter", {}),
    "hf": ("parity.adapters.hf", "HFAdapter", {}),
    "hf-static": ("parity.adapters.hf", "HFAdapter", {"cache": "static"}),  # decodes through StaticCache
    "keras": ("parity.adapters.keras_hub", "KerasAdapter", {}),
    "keras-jax": ("parity.adapters.keras_hub", "KerasAdapter", {"backend": "jax"}),
    "keras-torch": ("parity.adapters.keras_hub", "KerasAdapter", {"backend": "torch"}),
    "litgpt": ("parity.adapters.litgpt_pkg", "LitgptAdapter", {}),
}
DEFAULT_IMPLS = ("litgpt-style", "hf", "keras")


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group="parity.adapters")}


def known_names() -> list[str]:
    return sorted(set(BUILTIN) | set(_plugins()))


def get_adapter(name: str):
    """An adapter instance for a built-in name, an entry-point name, or `module:factory`."""
    if name in BUILTIN:
        mod, cls, kw = BUILTIN[name]
        return getattr(importlib.import_module(mod), cls)(**kw)
    plugins = _plugins()
    if name in plugins:
        return _made(name, lambda: plugins[name].load()())
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ParityInputError(f"{{option}} {name!r}: cannot load {attr!r} from {mod_name!r} ({e}); "
                                   "check the module is importable and the factory name", option="impls") from None
        adapter = _made(name, factory)
        for needed in ("name", "version", "check", "build", "run"):
            if not hasattr(adapter, needed):
                raise ImplementationError(name, "its factory", f"the adapter it returns has no {needed!r}",
                                          "give it every member of parity.adapters.base.Adapter (subclass it)")
        return adapter
    raise ParityInputError(
        f"unknown implementation {name!r}; use one of {', '.join(known_names())} or module:factory"
    )


def _made(name: str, factory):
    """A plug-in's factory called; its exception is an implementation failure (exit 3), not a traceback."""
    try:
        return factory()
    except ParityInputError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever a third-party factory raises
        import traceback

        raise ImplementationError(name, "its factory", f"{type(e).__name__}: {e}".splitlines()[0],
                                  "the traceback is in the log; check the plug-in imports and builds",
                                  traceback=traceback.format_exc()) from e
