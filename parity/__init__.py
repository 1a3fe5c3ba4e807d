"""parity: layer-by-layer numerical parity checks across Gemma implementations.

The names the README teaches, importable from here; each is loaded on first
use, so `import parity` imports no framework and no stage it does not need:

    from parity import run, Request, GemmaSpec, PRESETS, random_weights
    report = run(Request(spec=PRESETS["tiny-gemma"], impls=["hf"], dtypes=["bfloat16"]))
    print(report.verdict.headline)
"""

__version__ = "0.1.0"

_PUBLIC = {
    # running and the result
    "run": "parity.harness", "from_traces": "parity.harness", "Request": "parity.harness", "Report": "parity.harness",
    "Verdict": "parity.gate.verdict", "RunVerdict": "parity.gate.verdict", "decide": "parity.gate.verdict",
    # the model and its weights
    "GemmaSpec": "parity.model.spec", "PRESETS": "parity.model.presets", "Weights": "parity.model.weights",
    "random_weights": "parity.model.weights", "load_weights": "parity.model.weights", "map_weights": "parity.model.weights",
    # traces and adapters
    "Trace": "parity.capture.trace", "load_trace": "parity.capture.trace", "Adapter": "parity.adapters.base",
    "RunResult": "parity.adapters.base", "DecodeStep": "parity.adapters.base", "DecodeResult": "parity.adapters.base",
    "CacheView": "parity.adapters.base", "get_adapter": "parity.adapters",
    "recording": "parity.adapters.torch_hooks", "module_feeds": "parity.adapters.torch_hooks",
    "function_taps": "parity.adapters.torch_hooks", "expand_tap_map": "parity.model.taps",
    # errors, causes, checks
    "ParityInputError": "parity.errors", "ImplementationError": "parity.errors", "CAUSES": "parity.diagnose.causes",
    "check_within_tolerance": "parity.gate.checks", "check_norm_placement": "parity.gate.checks",
    "check_norm_unit_offset": "parity.gate.checks", "check_geglu": "parity.gate.checks", "check_gelu_tanh": "parity.gate.checks",
    "check_embedding_scale": "parity.gate.checks",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'parity' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
