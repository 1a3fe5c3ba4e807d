"""Record taps while an mlx-lm model runs its own forward pass, and feed arrays into it (isolated mode).

MLX modules have no hooks and `__call__` is looked up on the class, so the recorder swaps a wrapper module
into the parent's slot (an attribute, or an element of `model.model.layers`) for the duration of a `with`
block: the wrapper records its first input and/or its output and calls the original unchanged (in isolated
mode, with its first input replaced by the fed array). Functions a module evaluates inline (the GeGLU's
`nn.gelu` / `nn.gelu_approx` in the MLP, Gemma 2's `mx.softmax` over the scores in its attention) are
wrapped in the namespace the model's module looks them up in at call time and attributed to the decoder
layer now running. Nothing here re-computes the glue between modules.

Paths are attribute names joined by "." from the model (`model.layers.3.mlp.gate_proj`); a number indexes a
list. Pseudo-paths for inline functions: `model.layers.{i}:<function>` (first call while layer i runs).
Sides: "in" (first positional input), "out" (the output), "out<k>" (element k of a tuple output, as Gemma 4's
attention and decoder layer return), "kw:<name>" (a keyword argument the parent passes, Gemma 4's
`per_layer_input`), "obj<k>" (element k of the output kept as the mx object itself, for identity checks).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from parity.errors import ParityInputError


def to_numpy(x) -> np.ndarray:
    """An mx array (batch dimension dropped) as numpy; bfloat16 kept in 2 bytes (ml_dtypes), as the other
    adapters keep it, and widened exactly when the trace is built."""
    import mlx.core as mx

    x = x[0]
    if x.dtype == mx.bfloat16:
        import ml_dtypes

        return np.array(x.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(x)


def resolve(root, path: str):
    """(parent, key, module) for a dotted path; a digit indexes a list."""
    parent, key, node = None, None, root
    for part in path.split("."):
        parent, key = node, (int(part) if part.isdigit() else part)
        node = parent[key] if isinstance(key, int) else getattr(parent, key)
    return parent, key, node


def _put(parent, key, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _wrapper_class():
    import mlx.nn as nn

    class Recording(nn.Module):
        """Stands in for one module: `hook(inner, args, kwargs)` runs it."""

        def __init__(self, inner, hook: Callable) -> None:
            super().__init__()
            self.inner = inner
            self._hook = hook

        def __call__(self, *args, **kwargs):
            return self._hook(self.inner, args, kwargs)

        def __getattr__(self, name):
            # the parent's forward may read the module's attributes (Gemma 4's model reads each layer's
            # `layer_type` to build its masks): the wrapped module's, as if it were in its slot
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("inner"), name)

    return Recording


class Recorder:
    """`taps` fills while the model runs; every wrapper and inline patch is removed on exit.

    tap_map: tap -> (path, "in" | "out"); inline: pseudo-path suffix -> (namespace, attribute name, side)
    for functions called inside a layer ("out": its output; "in": its first argument);
    feeds: path -> array (no batch dimension) that replaces that module's first input.
    """

    def __init__(self, model, tap_map: dict[str, tuple[str, str]], feeds: dict | None = None,
                 inline: dict[str, tuple[object, list[str], str]] | None = None,
                 layers: list[str] = ()) -> None:
        self.model, self.tap_map, self.feeds = model, tap_map, feeds or {}
        self.inline, self.layers = inline or {}, list(layers)
        self.taps: dict[str, np.ndarray] = {}
        self.calls: dict[str, str] = {}  # pseudo-path -> which function name was called (first call)
        self.objects: dict[str, object] = {}  # "obj<k>" sides: the library's own objects, unconverted
        self._by_path: dict[str, list[tuple[str, str]]] = {}
        for tap, (path, side) in tap_map.items():
            self._by_path.setdefault(path, []).append((tap, side))
        self._running: list[str] = []  # the decoder layer path now running
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> "Recorder":
        try:
            module_paths = {p for p in self._by_path if ":" not in p} | set(self.feeds) | set(self.layers)
            for path in sorted(module_paths, key=lambda p: -p.count(".")):  # children before their parents
                self._wrap(path)
            for suffix, (ns, names, side) in self.inline.items():
                for name in names:
                    self._patch_inline(ns, name, suffix, side)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def _remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    # ------------------------------------------------------------ modules
    def _wrap(self, path: str) -> None:
        try:
            parent, key, inner = resolve(self.model, path)
        except (AttributeError, IndexError, KeyError) as e:
            raise KeyError(f"mlx: the model has no module {path!r} ({e}); mlx-lm's Gemma classes changed: "
                           "update parity/adapters/mlx") from None
        wrapper = _wrapper_class()(inner, lambda m, a, k, path=path: self._call(path, m, a, k))
        _put(parent, key, wrapper)
        self._undo.append(lambda: _put(parent, key, inner))

    def _call(self, path: str, inner, args, kwargs):
        import mlx.core as mx

        if not args:
            raise RuntimeError(f"mlx: module {path} was called without a positional input; update parity's mlx "
                               "recorder for this mlx-lm")
        for tap, side in self._by_path.get(path, []):
            if side == "in" and tap not in self.taps:  # the library's own input, before a feed replaces it
                self.taps[tap] = to_numpy(args[0])
            elif side.startswith("kw:") and tap not in self.taps and kwargs.get(side[3:]) is not None:
                self.taps[tap] = to_numpy(kwargs[side[3:]])
        if path in self.feeds:
            arr = np.asarray(self.feeds[path]())
            if (1, *arr.shape) != tuple(args[0].shape):
                raise RuntimeError(f"feed for {path}: shape {(1, *arr.shape)} != the module's input "
                                   f"{tuple(args[0].shape)}")
            args = (mx.array(np.asarray(arr, np.float32))[None].astype(args[0].dtype), *args[1:])
        layer = path in self.layers
        if layer:
            self._running.append(path)
        try:
            y = inner(*args, **kwargs)
        finally:
            if layer:
                self._running.pop()
        for tap, side in self._by_path.get(path, []):
            if tap in self.taps:
                continue
            if side == "out":
                self.taps[tap] = to_numpy(y)
            elif side.startswith("out"):
                self.taps[tap] = to_numpy(y[int(side[3:])])
            elif side.startswith("obj"):
                self.objects[tap] = y[int(side[3:])]
        return y

    # ------------------------------------------------------------ inline functions
    def _patch_inline(self, ns, name: str, suffix: str, side: str) -> None:
        original = getattr(ns, name, None)
        if original is None:
            return  # the taps it would give stay missing; the adapter says why

        def called(*args, **kwargs):
            y = original(*args, **kwargs)
            if self._running:
                pseudo = f"{self._running[-1]}:{suffix}"
                self.calls.setdefault(pseudo, name)
                for tap, tside in self._by_path.get(pseudo, []):
                    if tap not in self.taps:
                        self.taps[tap] = (args[0], y)[tside == "out"]  # converted on exit of the forward
            return y

        setattr(ns, name, called)
        self._undo.append(lambda: setattr(ns, name, original))

    def finish(self) -> dict[str, np.ndarray]:
        """The taps, inline ones converted to numpy (they were kept as mx arrays while the graph ran)."""
        return {t: v if isinstance(v, np.ndarray) else to_numpy(v) for t, v in self.taps.items()}


@contextmanager
def operand_taps(watch: list) -> Iterator[dict]:
    """Record the other operand of a multiplication by a watched array, as the library computes it inline.

    `watch`: (mx array of the model, tap) pairs compared by identity (a parameter such as Gemma 4's
    `layer_scalar`). MLX has no function mode; `mx.array.__mul__` is replaced on the class for the duration
    (MLX's own product still forms every result), and the first `h * watched` records h under the tap,
    before the product. Yields the dict the taps fill (numpy, batch dimension dropped).
    """
    import mlx.core as mx

    out: dict[str, np.ndarray] = {}
    original = mx.array.__mul__

    def mul(a, b):
        for t, tap in watch:
            if b is t and tap not in out:
                out[tap] = a
                break
        return original(a, b)

    mx.array.__mul__ = mul
    try:
        yield out
    finally:
        mx.array.__mul__ = original
    for tap, a in out.items():
        out[tap] = to_numpy(a)


@contextmanager
def recording(model, tap_map, feeds=None, inline=None, layers=()) -> Iterator[Recorder]:
    rec = Recorder(model, tap_map, feeds, inline, layers)
    with rec:
        yield rec


def module_feeds(tap_map: dict[str, tuple[str, str]], feed) -> dict:
    """Isolated mode: tap -> reference input becomes module path -> reader of that array."""
    if not feed:
        return {}
    out = {}
    for tap in feed:
        if tap not in tap_map or not tap_map[tap][1].startswith("out") or ":" in tap_map[tap][0]:
            raise ParityInputError(f"cannot feed tap {tap!r}: it is not an mlx-lm sub-module output")
        out[tap_map[tap][0]] = (lambda tap=tap: feed[tap])
    return out
