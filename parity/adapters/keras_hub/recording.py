"""Record taps while a keras model runs its own eager forward pass, and feed arrays into it (isolated mode).

keras has no forward hooks, so the recorder swaps instance attributes for the duration of a `with` block:
each sub-layer named in the tap map gets its `call` wrapped (record the first input and/or the output,
call the original unchanged, return its result untouched), a RoPE layer's `_compute_cos_sin_embedding`
gives the cos table, and a function a block evaluates inline (keras-hub's GeGLU calls
`keras.activations.gelu` in the decoder block's `call`) is wrapped in the namespace the block looks it
up in at call time, and attributed to the block now running. Nothing here re-computes the glue between
sub-layers, and nothing is specific to keras-hub's Gemma: another keras model passes its own tap map
(tap -> (layer path, "in" | "out")), feeds, block paths and inline function.

Layer paths are layer names joined by "/" from the root; `.attr` steps through an attribute (for a
sub-layer whose name keras generated). Pseudo-paths that are not keras layers: `<block>/<inline name>`
(the inline function), `<layer>:reverse` (the layer called with reverse=True: ReversibleEmbedding's tied
output head) and `<rope layer>:cos` (its cos table; the first call, q's).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.errors import ParityInputError

GELU = "gelu"  # decoder_block_{}/gelu: the inline keras.activations.gelu call in the decoder block's call
REVERSE = ":reverse"  # token_embedding:reverse: the tied output projection, token_embedding(x, reverse=True)
COS = ":cos"  # <rope layer>:cos: the cos table its _compute_cos_sin_embedding returns (first call: q's)
_COS_METHOD = "_compute_cos_sin_embedding"


@dataclass
class Inline:
    """A function the blocks call inline: wrapped as `namespace.<name>`, recorded per block as `tap`."""

    namespace: Any  # what the block's module looks the function up in at call time; None: not found
    name: str  # the attribute, and the pseudo-path's last part (`<block>/<name>`)
    tap: str  # with `{}` for the block index
    label: str  # how messages name the function
    absent: str  # why the tap is missing when the namespace has no such function
    # block 0's first call: (input as given, output, other args, kwargs, the original function)
    on_first: Callable[[Any, Any, tuple, dict, Callable], None] | None = None


@dataclass
class Hook:
    """A function every block may call inline (keras.ops.matmul, ...), wrapped while the recorder runs.

    Calls made while no block runs go straight to the original. Inside block i, `handle(recorder, i,
    original, args, kwargs)` runs instead: it calls `original` itself (possibly with a fed input), records
    what it recognises with `recorder.put`, and returns the original's result untouched.
    """

    namespace: Any  # the module the blocks look the function up in at call time; None: not found
    name: str
    handle: Callable[..., Any]
    path: str  # the pseudo-path's last part in tap and feed maps (`<block>/<path>`): not a layer to wrap
    taps: tuple[str, ...] = ()  # the tap families (with `{}`) it records: missing with `absent` if not installed
    absent: str = ""


class Recorder:
    """A context manager: `taps` and `missing` fill while the model runs; every wrapper is removed on exit.

    A tap map side is "in" (the layer's first input), "out" (its output, the first of a tuple) or
    "kw:<name>" (the keyword argument `name` it was called with); "+flat" after it says the tensor has
    no batch dimension (keras-hub folded batch into tokens: [T, ...] at batch 1).
    """

    def __init__(self, root, tap_map: dict[str, tuple[str, str]], feeds: dict[str, np.ndarray] | None = None,
                 blocks: list[str] = (), inline: Inline | None = None, hooks: list[Hook] = ()) -> None:
        self.root, self.tap_map, self.feeds = root, tap_map, feeds or {}
        self.blocks, self.inline, self.hooks = list(blocks), inline, list(hooks)
        self.state: dict[int, dict] = {}  # per block: what hooks remember between calls within one run
        self.taps: dict[str, np.ndarray] = {}
        self.missing: dict[str, str] = {}  # tap -> why it was not recorded
        self._by_path: dict[str, list[tuple[str, str]]] = {}
        for tap, (path, side) in tap_map.items():
            self._by_path.setdefault(path, []).append((tap, side))
        self._running: list[int] = []  # index of the block now running, for the inline function
        self._inline_calls: dict[int, int] = {}
        self._installed: list[tuple[Any, str, Any]] = []  # (layer, attribute, previous instance-level value)
        self._inline_original = None
        self._hooked: list[tuple[Any, str, Any]] = []  # (namespace, attribute, original function)

    # ------------------------------------------------------------ install
    def __enter__(self) -> Recorder:
        try:
            pseudo = tuple("/" + n for n in [h.path for h in self.hooks] + ([self.inline.name] if self.inline else []))
            paths = set(self._by_path) | set(self.feeds) | set(self.blocks)
            for path in sorted(p for p in paths if not (pseudo and p.endswith(pseudo))):
                self._install(path)
            if self.inline:
                self._install_inline()
            for hook in self.hooks:
                self._install_hook(hook)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        self._remove()
        if exc_type is None:
            self._drop_unattributable()
        return False

    def _install(self, path: str) -> None:
        try:
            layer = sub_layer(self.root, path.removesuffix(REVERSE).removesuffix(COS))
            attr = _COS_METHOD if path.endswith(COS) else "call"
            getattr(layer, attr)
        except (KeyError, ValueError, AttributeError) as e:  # keras-hub renamed or restructured a layer
            if path in self.feeds:
                raise ParityInputError(f"keras: cannot feed {path}: {e}") from None
            for tap, _side in self._by_path.get(path, []):
                self.missing[tap] = f"no keras-hub layer {path} in this version ({e})"
            return
        self._installed.append((layer, attr, layer.__dict__.get(attr)))
        new = self._cos_call(layer, path) if attr == _COS_METHOD else self._layer_call(layer, path)
        object.__setattr__(layer, attr, new)  # bypass keras attribute tracking

    def _install_inline(self) -> None:
        ns, name = self.inline.namespace, self.inline.name
        if ns is None or not callable(getattr(ns, name, None)):
            for i in range(len(self.blocks)):
                self.missing[self.inline.tap.format(i)] = self.inline.absent
            return
        self._inline_original = getattr(ns, name)
        setattr(ns, name, self._inline_call(self._inline_original))

    def _install_hook(self, hook: Hook) -> None:
        ns = hook.namespace
        original = getattr(ns, hook.name, None) if ns is not None else None
        if not callable(original):
            for family in hook.taps:
                for i in range(len(self.blocks)):
                    if family.format(i) in self.tap_map:
                        self.missing[family.format(i)] = hook.absent
            return

        def function(*args, **kwargs):
            if not self._running:
                return original(*args, **kwargs)
            return hook.handle(self, self._running[-1], original, args, kwargs)

        self._hooked.append((ns, hook.name, original))
        setattr(ns, hook.name, function)

    def put(self, tap: str, x, flat: bool = False) -> None:
        """Record a tensor the model computed under `tap` (if the tap map asks for it)."""
        if tap in self.tap_map:
            self.taps[tap] = to_numpy(x, batch=not flat)

    def _remove(self) -> None:
        for ns, name, original in reversed(self._hooked):
            setattr(ns, name, original)
        self._hooked.clear()
        if self._inline_original is not None:
            setattr(self.inline.namespace, self.inline.name, self._inline_original)
        for layer, attr, previous in reversed(self._installed):
            if previous is None:
                object.__delattr__(layer, attr)
            else:
                object.__setattr__(layer, attr, previous)
        self._installed.clear()

    def _drop_unattributable(self) -> None:
        """An inline function called other than once in a block cannot be told apart from its other calls."""
        if self._inline_original is None:
            return
        for i in range(len(self.blocks)):
            tap, n = self.inline.tap.format(i), self._inline_calls.get(i, 0)
            if n != 1:
                self.taps.pop(tap, None)
                self.missing[tap] = (f"{self.inline.label} was called {n} times in decoder block {i}, "
                                     "not once; cannot tell which call is the GeGLU's")

    # ------------------------------------------------------------ wrappers
    def _record(self, entries: list[tuple[str, str]], side: str, x) -> None:
        for tap, s in entries:
            s, _, flat = s.partition("+")
            if s == side:
                a = to_numpy(x, batch=flat != "flat")
                if tap.endswith(".attn.probs"):
                    a = a.reshape(-1, *a.shape[-2:])  # [kv, group, T, S] -> [heads, T, S]
                self.taps[tap] = a

    def _layer_call(self, layer, path: str):
        original = layer.call  # bound: whatever the class (or a test's monkeypatch) defines now
        entries = self._by_path.get(path, [])
        value = self.feeds.get(path)
        reverse_only = path.endswith(REVERSE)
        block = self.blocks.index(path) if path in self.blocks else None

        def call(*args, **kwargs):
            if reverse_only and not kwargs.get("reverse", False):
                return original(*args, **kwargs)  # the embedding lookup, not the output head
            if value is not None:
                args = (fed(value, args[0]), *args[1:])
            self._record(entries, "in", args[0])
            for tap, s in entries:
                name = s.partition("+")[0]
                if name.startswith("kw:") and kwargs.get(name[3:]) is not None:
                    self.put(tap, kwargs[name[3:]], flat=s.endswith("+flat"))
            if block is not None:
                self._running.append(block)
            try:
                y = original(*args, **kwargs)
            finally:
                if block is not None:
                    self._running.pop()
            self._record(entries, "out", y[0] if isinstance(y, (tuple, list)) else y)
            return y

        return call

    def _cos_call(self, layer, path: str):
        original = getattr(layer, _COS_METHOD)
        entries = self._by_path.get(path, [])

        def compute(*args, **kwargs):
            out = original(*args, **kwargs)
            for tap, _side in entries:
                if tap not in self.taps:  # q's table; k's is the same call again
                    cos = to_numpy(out[0])
                    self.taps[tap] = cos.reshape(cos.shape[0], cos.shape[-1])  # [1, T, 1, hd] -> [T, hd]
            return out

        return compute

    def _inline_call(self, original):
        inline = self.inline

        def function(x, *args, **kwargs):
            i = self._running[-1] if self._running else None
            value = self.feeds.get(f"{self.blocks[i]}/{inline.name}") if i is not None else None
            if value is not None:
                x = fed(value, x)
            y = original(x, *args, **kwargs)
            if i is not None:
                self._inline_calls[i] = self._inline_calls.get(i, 0) + 1
                tap = inline.tap.format(i)
                if tap in self.tap_map:
                    self.taps[tap] = to_numpy(y)
                if i == 0 and self._inline_calls[i] == 1 and inline.on_first is not None:
                    inline.on_first(x, y, args, kwargs, original)
            return y

        return function


@contextmanager
def call_order(layer, names: tuple[str, ...]):
    """Yield a list that fills with the names of `layer`'s sub-layers (attributes) as they are called."""
    order: list[str] = []
    installed = []
    try:
        for n in names if layer is not None else ():
            sub = getattr(layer, n, None)
            if sub is None:
                continue
            original = sub.call

            def call(*args, _n=n, _f=original, **kwargs):
                order.append(_n)
                return _f(*args, **kwargs)

            installed.append((sub, sub.__dict__.get("call")))
            object.__setattr__(sub, "call", call)
        yield order
    finally:
        for sub, previous in installed:
            if previous is None:
                object.__delattr__(sub, "call")
            else:
                object.__setattr__(sub, "call", previous)


def to_numpy(x, batch: bool = True) -> np.ndarray:
    """A recorded tensor as numpy, float32 unless float64 (bf16/fp16 -> fp32 is exact), batch dimension dropped
    (`batch=False`: the tensor has none; integer ids become float64, exactly)."""
    from keras import ops

    a = np.asarray(ops.convert_to_numpy(x))
    if np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64)
    elif a.dtype != np.float64:
        a = a.astype(np.float32)
    return (a[0] if batch else a).copy()


def sub_layer(root, path: str):
    """A keras layer by a path of layer names, e.g. decoder_block_0/pre_ffw_norm."""
    import keras

    first, *rest = path.split("/")
    layer = root.get_layer(first)
    for part in rest:
        if part.startswith("."):  # an attribute, for a sub-layer whose name keras generated
            layer = getattr(layer, part[1:], None)
            if not isinstance(layer, keras.layers.Layer):
                raise KeyError(f"no keras layer at attribute {part[1:]!r} on the path {path!r}")
            continue
        # direct sub-layers as keras tracks them (what Model.layers lists); not vars(): the torch
        # backend keeps sub-layers in torch.nn.Module._modules
        subs = [s for s in layer._flatten_layers(include_self=False, recursive=False) if s.name == part]
        if len(subs) != 1:
            raise KeyError(f"keras layer {layer.name!r} has no single sub-layer named {part!r}")
        layer = subs[0]
    return layer


def fed(value: np.ndarray, like):
    """The fed array as a tensor of the replaced input's dtype, batch dimension added."""
    from keras import backend, ops

    t = ops.convert_to_tensor(np.asarray(value)[None], dtype=backend.standardize_dtype(like.dtype))
    if tuple(t.shape) != tuple(like.shape):
        raise ParityInputError(f"keras: fed array of shape {tuple(t.shape)} replaces an input of {tuple(like.shape)}")
    return t
