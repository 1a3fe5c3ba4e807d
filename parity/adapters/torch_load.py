"""Build a torch model without a second copy of its weights.

The module tree is constructed on the meta device (no memory, no random
init), given real but uninitialised storage in the target dtype, and each
parameter is filled in place from the canonical weights a row block at a
time. At a Gemma-2B shape this is the difference between 5 GB and 15 GB.
"""

from __future__ import annotations

import numpy as np

from parity.model.weights import Part, Weights, fill


def numpy_view(t) -> np.ndarray:
    """A writable numpy array sharing `t`'s memory (bfloat16 as ml_dtypes.bfloat16)."""
    import ml_dtypes
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def materialize(module, dtype, skip=()) -> None:
    """Meta parameters -> uninitialised CPU storage in `dtype`, keeping tied parameters tied.

    `skip`: qualified-name prefixes left on the meta device (streamed layers).
    """
    import torch

    ties = {}  # id(param) -> every (module, attribute) holding it
    for mod_name, mod in module.named_modules():
        if any((mod_name + ".").startswith(p) for p in skip):
            continue
        for name, p in mod.named_parameters(recurse=False):
            ties.setdefault(id(p), []).append((mod, name))
    for holders in ties.values():
        mod, name = holders[0]
        old = getattr(mod, name)
        new = torch.nn.Parameter(torch.empty(old.shape, dtype=dtype, device="cpu"), requires_grad=False)
        for m, n in holders:
            setattr(m, n, new)


def fill_parameters(model, plan: dict[str, Part], weights: Weights, prefix: str = "") -> None:
    """Fill every materialised parameter from its Part (the plan comes from `map_weights` over `parts`)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_meta:
                fill(weights, plan[prefix + name], numpy_view(p))


def release_parameters(module) -> None:
    """Back to the meta device: the storage is freed, the module tree stays."""
    import torch

    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                  requires_grad=False))


def load(model, plan: dict[str, Part], weights: Weights, dtype, layers: list[str]) -> None:
    """Give a meta-built model its weights, streaming its `layers` (module paths) when it is too big.

    Whether to stream is `torch_setup.stream_layers` of the model's size in
    `dtype`. A streamed layer gets its weights from the store just before it
    runs and gives them back right after, so at most one layer's weights are
    resident beside the embedding and the head: a Gemma-2-27B shape in
    bfloat16 needs about 1.1 GB per layer instead of 54 GB.
    """
    from parity.adapters.torch_setup import stream_layers

    nbytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize  # tied parameters counted once
    layers = layers if stream_layers(nbytes) else []
    skip = [p + "." for p in layers]
    materialize(model, dtype, skip)
    fill_parameters(model, plan, weights)
    for path in layers:
        layer = model.get_submodule(path)

        def fetch(module, args, _prefix=path + "."):
            materialize(module, dtype)
            fill_parameters(module, plan, weights, _prefix)

        def drop(module, args, output):
            release_parameters(module)

        layer.register_forward_pre_hook(fetch)
        layer.register_forward_hook(drop)
    model.parity_streamed = list(layers)
