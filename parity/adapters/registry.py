"""The built-in implementations, one line each, and how a name becomes an adapter.

A new built-in is its adapter module (or folder) under parity/adapters/ and one `Builtin` line in BUILTINS.
Everything else reads the table: the default `--impls` list, the names `--help` shows, the one-line message
when a library is missing, and the layering test's list of frameworks (allowed only under parity/adapters/).
Nothing here imports a framework: an entry is imported only when its name is asked for.

Users add their own without touching this file: the `parity.adapters` entry-point group, or `--impls
module:factory`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Mapping

from parity.adapters.declared import missing_members
from parity.adapters.versions import check as check_versions
from parity.errors import BackendMissing, ImplementationError, ParityInputError, Unsupported


@dataclass(frozen=True)
class Builtin:
    name: str
    factory: str  # "module:attr", called with `options`; imported only when `name` is asked for
    frameworks: tuple[str, ...]  # top-level packages its adapter's modules import (the layering test checks it)
    missing: str  # the fix, one line, when a package in `needs` is not installed
    needs: tuple[str, ...] | None = None  # import names that must be installed ("a|b": either); None: frameworks
    extra: str | None = None  # the pyproject extra that installs it; None: parity's own dependencies do
    options: Mapping[str, object] = field(default_factory=dict)  # keyword arguments to the factory
    default: bool = False  # run when no --impls is given, if installed
    # feature ("run", "decode", "gemma1/2/3") -> the library versions it works with, pip's syntax
    # ("transformers>=5.3"); checked from installed metadata when the name is asked for (parity/adapters/versions.py)
    versions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # it may compute with other weights or roundings than it is given (Adapter.held: quantized weights, an F16
    # KV cache): at real sizes, where it runs in another process, its adapter is also made in the main one to say so
    holds: bool = False
    # the run-wide settings (`--kv-cache`, `--flash-attn`: parity.harness.Request.runtime) it takes, as factory
    # keyword arguments; a setting no chosen implementation takes is refused up front
    settable: tuple[str, ...] = ()

    def absent(self) -> list[str]:
        """The packages in `needs` that cannot be found (none is imported to find out)."""
        return [n.replace("|", " or ") for n in (self.frameworks if self.needs is None else self.needs)
                if not any(_findable(alt) for alt in n.split("|"))]


KERAS = ("keras", "keras_hub", "keras_nlp", "jax", "jaxlib", "tensorflow", "torch")  # its backends included
KERAS_HUB = "keras_hub|keras_nlp"  # keras-nlp: keras-hub's name before 0.18
# docs/versions.md: where each bound comes from (measured, or the release that added the API)
HF_VERSIONS = {
    "run": ("transformers>=4.50", "torch>=2.4"),
    "decode": ("transformers>=5.3",),  # generate()'s step inputs with next_sequence_length= (5.3.0 on)
    "gemma3": ("transformers>=4.50",),  # Gemma3ForCausalLM (text) first in 4.50.0
    "gemma4": ("transformers>=5.5",),  # Gemma4ForCausalLM (hf._check_gemma4 also feature-detects the class)
}
KERAS_VERSIONS = {"run": ("keras>=3.5", "keras-hub>=0.18", "jax>=0.4.30"), "gemma3": ("keras-hub>=0.19",)}

BUILTINS: dict[str, Builtin] = {b.name: b for b in (
    Builtin("litgpt-style", "parity.adapters.litgpt_style:LitgptStyleAdapter", ("torch",),
            "pip install torch", default=True, versions={"run": ("torch>=2.4",)}),
    Builtin("hf", "parity.adapters.hf:HFAdapter", ("torch", "transformers"),
            "pip install 'transformers>=4.50'", default=True, versions=HF_VERSIONS),
    Builtin("hf-static", "parity.adapters.hf:HFAdapter", ("torch", "transformers"),  # decodes through StaticCache
            "pip install 'transformers>=4.50'", options={"cache": "static"}, versions=HF_VERSIONS),
    Builtin("keras", "parity.adapters.keras_hub:KerasAdapter", KERAS, "pip install keras-hub jax",
            needs=("keras", KERAS_HUB, "jax"), default=True, versions=KERAS_VERSIONS),
    Builtin("keras-jax", "parity.adapters.keras_hub:KerasAdapter", KERAS, "pip install keras-hub jax",
            needs=("keras", KERAS_HUB, "jax"), options={"backend": "jax"}, versions=KERAS_VERSIONS),
    Builtin("keras-torch", "parity.adapters.keras_hub:KerasAdapter", KERAS, "pip install keras-hub torch",
            needs=("keras", KERAS_HUB, "torch"), options={"backend": "torch"},
            versions={**KERAS_VERSIONS, "run": ("keras>=3.5", "keras-hub>=0.18", "torch>=2.4")}),
    # the released litgpt (0.5.x) pins huggingface-hub<1.4, which holds transformers at 5.3: an extra, kept apart
    Builtin("litgpt", "parity.adapters.litgpt_pkg:LitgptAdapter", ("litgpt", "torch"),
            "pip install litgpt (parity's extra: pip install 'parity[litgpt]')", extra="litgpt",
            versions={"run": ("litgpt>=0.5", "torch>=2.4")}),
    Builtin("mlx", "parity.adapters.mlx:MlxAdapter", ("mlx", "mlx_lm"), "pip install 'parity[mlx]'", extra="mlx"),
    Builtin("mlx-kv8", "parity.adapters.mlx:MlxAdapter", ("mlx", "mlx_lm"), "pip install 'parity[mlx]'", extra="mlx", options={"kv_bits": 8}, holds=True),  # noqa: E501
    Builtin("mlx-kv4", "parity.adapters.mlx:MlxAdapter", ("mlx", "mlx_lm"), "pip install 'parity[mlx]'", extra="mlx", options={"kv_bits": 4}, holds=True),  # noqa: E501
    Builtin("ort-genai", "parity.adapters.ort_genai:OrtGenaiAdapter", ("onnxruntime_genai", "onnxruntime", "onnx", "transformers"), "pip install 'parity[ort-genai]'", needs=("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir"), extra="ort-genai"),  # noqa: E501
    Builtin("ort-genai-int8", "parity.adapters.ort_genai:OrtGenaiAdapter", ("onnxruntime_genai", "onnxruntime", "onnx", "transformers"), "pip install 'parity[ort-genai]'", needs=("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir"), extra="ort-genai", options={"precision": "int8"}, holds=True),  # noqa: E501
    Builtin("ort-genai-int4", "parity.adapters.ort_genai:OrtGenaiAdapter", ("onnxruntime_genai", "onnxruntime", "onnx", "transformers"), "pip install 'parity[ort-genai]'", needs=("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir"), extra="ort-genai", options={"precision": "int4"}, holds=True),  # noqa: E501
    Builtin("llama-cpp", "parity.adapters.llama_cpp:LlamaCppAdapter", ("llama_cpp", "gguf"), "pip install 'parity[llama-cpp]'", extra="llama-cpp", options={"weights": "f32"}, settable=("kv_type", "flash_attn"), holds=True),  # noqa: E501
    Builtin("llama-cpp-f16", "parity.adapters.llama_cpp:LlamaCppAdapter", ("llama_cpp", "gguf"), "pip install 'parity[llama-cpp]'", extra="llama-cpp", options={"weights": "f16"}, settable=("kv_type", "flash_attn"), holds=True),  # noqa: E501
    Builtin("llama-cpp-bf16", "parity.adapters.llama_cpp:LlamaCppAdapter", ("llama_cpp", "gguf"), "pip install 'parity[llama-cpp]'", extra="llama-cpp", options={"weights": "bf16"}, settable=("kv_type", "flash_attn"), holds=True),  # noqa: E501
    Builtin("llama-cpp-q8_0", "parity.adapters.llama_cpp:LlamaCppAdapter", ("llama_cpp", "gguf"), "pip install 'parity[llama-cpp]'", extra="llama-cpp", options={"weights": "q8_0"}, settable=("kv_type", "flash_attn"), holds=True),  # noqa: E501
    Builtin("llama-cpp-q4_0", "parity.adapters.llama_cpp:LlamaCppAdapter", ("llama_cpp", "gguf"), "pip install 'parity[llama-cpp]'", extra="llama-cpp", options={"weights": "q4_0"}, settable=("kv_type", "flash_attn"), holds=True),  # noqa: E501
    Builtin("llama-cpp-q4_k", "parity.adapters.llama_cpp:LlamaCppAdapter", ("llama_cpp", "gguf"), "pip install 'parity[llama-cpp]'", extra="llama-cpp", options={"weights": "q4_k"}, settable=("kv_type", "flash_attn"), holds=True),  # noqa: E501
)}


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None  # None also where sys.modules[name] is None
    except (ImportError, ValueError):
        return False


def default_impls() -> list[str]:
    """Every built-in marked default, installed or not (a missing one is skipped with its message)."""
    return [b.name for b in BUILTINS.values() if b.default]


DEFAULT_IMPLS = tuple(default_impls())  # as shipped; the live table is read through default_impls()


def installed(name: str) -> bool:
    """Whether a built-in's packages can be found (its own check may still refuse a spec)."""
    return not BUILTINS[name].absent()


def listing() -> str:
    """The built-ins for --help: each name, a missing one marked, and the default list."""
    names = ", ".join(n if installed(n) else f"{n} (not installed)" for n in BUILTINS)
    return f"built-ins: {names}; default: every installed one of {', '.join(default_impls())}"


def frameworks() -> frozenset[str]:
    """Every framework a built-in runs on: the packages only parity/adapters/ may import."""
    return frozenset(f for b in BUILTINS.values() for f in b.frameworks)


def backend_missing(name: str, absent: str) -> BackendMissing:
    """The one-line error for implementation `name` without `absent`, with the fix its registry line declares."""
    entry = BUILTINS.get(name)
    fix = entry.missing if entry else f"install it, or drop {name} from {{option}}"
    return BackendMissing(f"implementation {name!r} needs {absent}, which is not installed here; {fix}", option="impls")


def require_importable(name: str, *modules: str) -> None:
    """Import each of `modules` (an adapter's check), refusing `name` with backend_missing for the first that is not
    installed (its pip name: underscores as dashes)."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError:
            raise backend_missing(name, mod.replace("_", "-")) from None


def require(name: str, feature: str = "run", error=BackendMissing) -> None:
    """Refuse built-in `name` (exit 2, one line) when an installed library is outside the range its line declares
    for `feature` ("run", "decode", "gemma1/2/3"); a plug-in, or a feature with no range, passes."""
    entry = BUILTINS.get(name)
    if entry is not None:
        check_versions(name, entry.versions.get(feature, ()), feature, error)


def require_spec(name: str, family: int) -> None:
    """`require` for the spec's Gemma family (e.g. Gemma 3 on a transformers without Gemma 3 classes): the spec
    is what this install cannot build, so it is Unsupported (a default implementation is skipped, saying so)."""
    require(name, f"gemma{family}", Unsupported)


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group="parity.adapters")}


def known_names() -> list[str]:
    return sorted(set(BUILTINS) | set(_plugins()))


def get_adapter(name: str, settings: Mapping[str, str] | None = None):
    """An adapter instance for a built-in name, an entry-point name, or `module:factory`; `settings`: the
    run-wide runtime settings (Request.runtime), passed to a built-in that declares them `settable`."""
    if name in BUILTINS:
        b = BUILTINS[name]
        given = {k: v for k, v in (settings or {}).items() if k in b.settable}
        return _builtin(dataclasses.replace(b, options={**b.options, **given}) if given else b)
    plugins = _plugins()
    if name in plugins:
        return _checked(name, _made(name, lambda: plugins[name].load()()), "its entry point")
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ParityInputError(f"{{option}} {name!r}: cannot load {attr!r} from {mod_name!r} ({e}); "
                                   "check the module is importable and the factory name", option="impls") from None
        return _checked(name, _made(name, factory), "its factory")
    raise ParityInputError(
        f"unknown implementation {name!r}; use one of {', '.join(known_names())} or module:factory"
    )


def _builtin(b: Builtin):
    absent = b.absent()
    if absent:
        raise backend_missing(b.name, " and ".join(absent))
    require(b.name)  # an installed library outside the declared range: one line now, not a crash later
    mod_name, _, attr = b.factory.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        # its module, or a package it imports at the top: not installed here (anything else is a bug: raised)
        top = (e.name or "").split(".")[0]
        if not (mod_name == e.name or mod_name.startswith(f"{e.name}.") or top in b.frameworks):
            raise
        raise backend_missing(b.name, e.name) from None
    return getattr(module, attr)(**b.options)


def _checked(name: str, adapter, where: str):
    """A user's adapter missing a required member is refused here (exit 3), not with an AttributeError later."""
    lacks = missing_members(adapter)
    if lacks:
        raise ImplementationError(name, where, f"the adapter it returns has no {lacks[0]!r}",
                                  "give it every member of parity.adapters.base.Adapter (subclass it)")
    return adapter


def _made(name: str, factory):
    """A plug-in's factory called; its exception is an implementation failure (exit 3), not a traceback."""
    try:
        return factory()
    except ParityInputError:
        raise
    except SystemExit as e:  # a plug-in that exits the process must not end the run (or pytest) with its code
        raise ImplementationError(name, "its factory", f"it called sys.exit({e.code!r})",
                                  "a factory must return an adapter or raise, never exit the process") from None
    except Exception as e:  # noqa: BLE001 -- whatever a third-party factory raises
        import traceback

        raise ImplementationError(name, "its factory", f"{type(e).__name__}: {e}".splitlines()[0],
                                  "the traceback is in the log; check the plug-in imports and builds",
                                  traceback=traceback.format_exc()) from e

