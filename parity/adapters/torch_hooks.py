"""Record (and, in isolated mode, feed) module inputs and outputs with PyTorch hooks.

Shared by the adapters whose library is PyTorch. Hooks observe the library's
own forward pass; nothing here re-computes the glue between sub-modules.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import numpy as np

# tap name -> (module path, "in" | "out" | "out1"); "out1" is the second output (HF attention's probabilities)
TapMap = dict[str, tuple[str, str]]


def to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach()[0]  # drop the batch dimension
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        # kept in 2 bytes while the model runs (a Gemma-2B trace is 820 MB widened, 410 MB not); widened
        # to float32 (exactly) when the trace is built or written, one tap at a time
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.cpu().numpy().copy()  # the module's own output may be modified in place later


def _first_tensor(args, kwargs):
    import torch

    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise RuntimeError("no tensor input to record")


def _replace_inputs(path: str, args, kwargs, shape: tuple, make):
    """Every occurrence of the module's hidden-state input, positional or keyword, replaced by `make(old)`.

    The hidden-state input is the first tensor argument (or the `hidden_states`/`x`/`input` keyword); when
    the module takes only keywords under other names (`query_input=...`), the one tensor of the fed shape.
    Every argument that is that same tensor object is replaced too, so `attn(h, h)` (query and key/value
    from one tensor) is fed on both sides; other tensors (rotary tables, masks) are left alone. A module
    whose input cannot be told is an error naming the module and its inputs, never a silent no-op.
    """
    import torch

    primary = None
    if args and isinstance(args[0], torch.Tensor):
        primary = args[0]
    else:
        for key in ("hidden_states", "x", "input"):
            if isinstance(kwargs.get(key), torch.Tensor):
                primary = kwargs[key]
                break
    if primary is None:
        same = {id(v): v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and tuple(v.shape) == shape}
        if len(same) == 1:
            primary = next(iter(same.values()))
        else:
            names = [f"arg{i}" for i, v in enumerate(args) if isinstance(v, torch.Tensor)]
            names += [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
            raise RuntimeError(f"cannot feed module {path!r}: {len(same)} tensor inputs of shape {shape} among "
                               f"{names or 'no tensor inputs'}; isolated mode needs exactly one hidden-state input")
    new = make(primary)
    args = tuple(new if v is primary else v for v in args)
    kwargs = {k: (new if v is primary else v) for k, v in kwargs.items()}
    return args, kwargs


def module_feeds(tap_map: TapMap, feed: dict[str, np.ndarray] | None, impl: str) -> dict | None:
    """Isolated mode: tap -> reference input becomes module path -> array (only sub-module outputs)."""
    from parity.errors import ParityInputError

    if not feed:
        return None
    out = {}
    for tap in feed:
        if tap not in tap_map or tap_map[tap][1] != "out":
            raise ParityInputError(f"cannot feed tap {tap!r}: it is not a {impl} sub-module output")
        out[tap_map[tap][0]] = functools.partial(feed.__getitem__, tap)  # read when the module runs
    return out


@contextmanager
def recording(model, tap_map: TapMap, feed: dict[str, tuple[str, np.ndarray]] | None = None) -> Iterator[dict]:
    """Yield a dict that fills with tap -> array while the model runs.

    feed: module path -> array that replaces that module's first tensor input
    (cast to the tensor it replaces, batch dimension added).
    """
    import torch

    modules = dict(model.named_modules())
    out: dict[str, np.ndarray] = {}
    handles = []
    for tap, (path, side) in tap_map.items():
        if path not in modules:
            raise KeyError(f"tap {tap}: model has no module {path!r}")
        mod = modules[path]
        if side == "in":
            def pre(mod, args, kwargs, tap=tap):
                if tap not in out:  # a module called twice per forward: its first call is the tap
                    out[tap] = to_numpy(_first_tensor(args, kwargs))

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod, args, output, tap=tap):
                if tap not in out:
                    y = output[0] if isinstance(output, (tuple, list)) else output
                    out[tap] = to_numpy(y)

            def post1(mod, args, output, tap=tap):
                if tap not in out and isinstance(output, (tuple, list)) and output[1] is not None:
                    out[tap] = to_numpy(output[1])

            handles.append(mod.register_forward_hook(post1 if side == "out1" else post))
    # registered after the taps: an "in" tap records what the library computed, before the feed replaces it
    for path, value in (feed or {}).items():
        def pre(mod, args, kwargs, value=value, path=path):
            value = value() if callable(value) else value  # a lazily read reference tap, read now
            arr = np.asarray(value)
            shape = (1, *arr.shape)

            def make(old):
                if tuple(old.shape) != shape:
                    raise RuntimeError(f"feed for {path}: shape {shape} != the module's input {tuple(old.shape)}")
                return torch.as_tensor(arr)[None].to(dtype=old.dtype, device=old.device)

            return _replace_inputs(path, args, kwargs, shape, make)

        handles.append(modules[path].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def function_taps(owner, name: str, scopes: dict[str, str], model, out: dict) -> Iterator[None]:
    """Tap a plain function (not a module) that the library calls inside some modules' forward.

    `owner.name` is the function (e.g. `torch.nn.functional`, "gelu", or a library module's own `gelu`);
    `scopes` maps a tap to the module path inside whose forward the call happens (`layers.0.mlp.act` ->
    `model.layers.0.mlp`). While that module runs, the function's first output is recorded under the tap
    and returned unchanged: the library's own value, not a recomputation. Use inside `recording(...)` with
    its dict as `out`. Outputs that are a module's return value (a head written as `x @ embed.weight.T`
    inside the model's forward) need no helper: tap the module that returns them, e.g. `("", "out")`.
    """
    modules = dict(model.named_modules())
    fn = getattr(owner, name)
    current: list[str] = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        y = fn(*args, **kwargs)
        if current and current[-1] not in out:
            out[current[-1]] = to_numpy(y)
        return y

    def enter(mod, args, tap):
        current.append(tap)  # a hook that returns something replaces the input: return nothing

    def leave(mod, args, output):
        current.pop()  # likewise, the output

    handles = []
    for tap, path in scopes.items():
        if path not in modules:
            raise KeyError(f"tap {tap}: model has no module {path!r}")
        handles.append(modules[path].register_forward_pre_hook(functools.partial(enter, tap=tap)))
        handles.append(modules[path].register_forward_hook(leave))
    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, fn)
        for h in handles:
            h.remove()


@contextmanager
def argument_taps(model, taps: dict[str, tuple[str, str]], out: dict) -> Iterator[None]:
    """Record a module's named input argument (not its first one): tap -> (module path, argument name).

    The argument is found by binding the call to the module's own forward signature, so a positional or a
    keyword call records the same value, the one the library passed. Use inside `recording(...)` with its
    dict as `out`; a module called twice per forward records its first call, as `recording` does.
    """
    import inspect

    modules = dict(model.named_modules())
    handles = []
    for tap, (path, arg) in taps.items():
        if path not in modules:
            raise KeyError(f"tap {tap}: model has no module {path!r}")
        sig = inspect.signature(modules[path].forward)

        def pre(mod, args, kwargs, tap=tap, arg=arg, sig=sig):
            if tap in out:
                return
            value = sig.bind_partial(*args, **kwargs).arguments.get(arg)
            if value is None:
                raise RuntimeError(f"tap {tap}: module {type(mod).__name__} was called without {arg!r}")
            out[tap] = to_numpy(value)

        handles.append(modules[path].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def output_taps(model, taps: dict[str, tuple[str, int | None]], out: dict, flat=frozenset()) -> Iterator[None]:
    """Record element `index` of a module's tuple output (None: the output itself): tap -> (module path, index).

    `flat`: taps whose module runs on the tokens flattened to [B*T, ...] (HF's MoE router): their values
    have no batch dimension to drop, and are recorded whole.
    """
    modules = dict(model.named_modules())
    handles = []
    for tap, (path, index) in taps.items():
        if path not in modules:
            raise KeyError(f"tap {tap}: model has no module {path!r}")

        def post(mod, args, output, tap=tap, index=index):
            if tap not in out:
                if index is not None and (not isinstance(output, (tuple, list)) or len(output) <= index):
                    raise RuntimeError(f"tap {tap}: {type(mod).__name__} returned no output #{index}")
                out[tap] = _record(output if index is None else output[index], tap in flat)

        handles.append(modules[path].register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def operand_taps(watch: list, out: dict, flat=frozenset()) -> Iterator[None]:
    """Record the other operand of a multiplication by a watched tensor, as the library computes it inline.

    `watch`: (tensor object of the model, tap) pairs, a buffer or a parameter compared by identity; `flat`
    as for `output_taps`.
    While active (a torch function mode, so no library code is patched), the first multiplication
    (`*`, `*=`, `mul`, `mul_`) that has a watched tensor, or a tensor indexed out of one
    (`per_expert_scale[top_k_index]`), as one operand records the other operand under the tap, before
    the product is formed: `h *= layer_scalar` records the block output before the scalar, the library's
    own tensor. Every other operation runs untouched.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    muls = {torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__mul__, torch.Tensor.__rmul__,
            torch.Tensor.__imul__, torch.mul}
    getitem = torch.Tensor.__getitem__
    watched: list[tuple[object, str]] = list(watch)

    def tap_of(x):
        for t, tap in watched:
            if x is t:
                return tap
        return None

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in muls and len(args) == 2:
                for mine, other in ((args[0], args[1]), (args[1], args[0])):
                    tap = tap_of(mine)
                    if tap is not None and tap not in out and isinstance(other, torch.Tensor):
                        out[tap] = _record(other, tap in flat)  # copied before an in-place product overwrites it
                        break
            result = func(*args, **kwargs)
            if func is getitem and args and tap_of(args[0]) is not None and isinstance(result, torch.Tensor):
                watched.append((result, tap_of(args[0])))  # the indexed copy multiplies in its place
            return result

    with Mode():
        yield


def _record(t, flat: bool):
    return to_numpy(t[None] if flat else t)  # a flat [B*T, ...] value with B = 1 is the [T, ...] row set
