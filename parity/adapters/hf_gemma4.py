"""Gemma 4 through transformers' own `Gemma4ForCausalLM`: weight names, taps and what the adapter observes.

Kept apart from adapters/hf.py, which drives the build, run and decode loop for every family; this
module holds what only Gemma 4 needs. Every tap is recorded from a value the library computes:

* module outputs and inputs by hooks, as for Gemma 1-3 (the router's projection, its probabilities and
  chosen experts, the dense and MoE branches' norms, the PLE branch's norm);
* `per_layer_input`: the argument the model passes each decoder layer (its slice of the PLE tensor);
* `moe.weights` and `pre_scalar`, computed inline in `Gemma4TextRouter.forward` and
  `Gemma4TextDecoderLayer.forward`: the operand the library multiplies by `per_expert_scale[top_k_index]`
  (the renormalised top-k weights) and by `layer_scalar` (the block output before the scalar),
  recorded by a torch function mode as the multiplication happens (torch_hooks.operand_taps);
* which layer's keys and values each KV-shared layer reads: the very tensors the library hands its
  attention function, matched by identity to the layer that computed them (`kv_source`).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from typing import Iterator

import numpy as np

CLASS = "Gemma4ForCausalLM"

# the tensors Gemma 4 adds to the Gemma 1-3 names of parity.adapters.hf.NAME_MAP (which joins the two for
# family 4): literal, so map_weights' every-tensor-used-once check runs. Shared layers have no k/v projections or
# norms (transformers builds none), and v_norm has no weight.
NAMES = (
    "model.layers.{}.layer_scalar",
    "model.layers.{}.per_layer_input_gate.weight",
    "model.layers.{}.per_layer_projection.weight",
    "model.layers.{}.post_per_layer_input_norm.weight",
    "model.layers.{}.router.scale",
    "model.layers.{}.router.proj.weight",
    "model.layers.{}.router.per_expert_scale",
    "model.layers.{}.experts.gate_up_proj",
    "model.layers.{}.experts.down_proj",
    "model.layers.{}.post_feedforward_layernorm_1.weight",
    "model.layers.{}.pre_feedforward_layernorm_2.weight",
    "model.layers.{}.post_feedforward_layernorm_2.weight",
    "model.embed_tokens_per_layer.weight",
    "model.per_layer_model_projection.weight",
    "model.per_layer_projection_norm.weight",
)
SCALAR = "layer_scalar"  # a buffer in transformers (not a parameter), a weight in parity

# taps `recording` takes (module outputs / first inputs); eager attention returns its probabilities
TAP_MAP = {
    "embed": ("model.embed_tokens", "out"),  # Gemma4TextScaledWordEmbedding applies sqrt(hidden) itself
    "layers.{}.attn_norm": ("model.layers.{}.input_layernorm", "out"),
    "layers.{}.attn.probs": ("model.layers.{}.self_attn", "out1"),
    "layers.{}.attn": ("model.layers.{}.self_attn", "out"),
    "layers.{}.post_attn_norm": ("model.layers.{}.post_attention_layernorm", "out"),
    "layers.{}.attn_residual": ("model.layers.{}.pre_feedforward_layernorm", "in"),
    "layers.{}.mlp_norm": ("model.layers.{}.pre_feedforward_layernorm", "out"),
    "layers.{}.mlp.gate": ("model.layers.{}.mlp.gate_proj", "out"),
    "layers.{}.mlp.up": ("model.layers.{}.mlp.up_proj", "out"),
    "layers.{}.mlp.act": ("model.layers.{}.mlp.act_fn", "out"),
    "layers.{}.mlp.hidden": ("model.layers.{}.mlp.down_proj", "in"),
    "layers.{}.mlp": ("model.layers.{}.mlp", "out"),
    "layers.{}.dense_branch": ("model.layers.{}.post_feedforward_layernorm_1", "out"),
    "layers.{}.moe_branch": ("model.layers.{}.post_feedforward_layernorm_2", "out"),
    "layers.{}.post_mlp_norm": ("model.layers.{}.post_feedforward_layernorm", "out"),
    "layers.{}.ple": ("model.layers.{}.post_per_layer_input_norm", "out"),
    "layers.{}.out": ("model.layers.{}", "out"),
    "final_norm": ("model.norm", "out"),
}
# the decoder layer's second argument: `per_layer_inputs[:, :, i, :]`, sliced by the model's forward
ARGUMENT_TAPS = {"layers.{}.per_layer_input": ("model.layers.{}", "per_layer_input")}
# the router runs on the tokens flattened to [B*T, D]; its outputs are (probs, top-k weights, top-k index)
ROUTER_TAPS = {
    "layers.{}.moe.router_logits": ("model.layers.{}.router.proj", None),
    "layers.{}.moe.router_probs": ("model.layers.{}.router", 0),
    "layers.{}.moe.experts": ("model.layers.{}.router", 2),
}
INDEX_TAPS = ("moe.experts",)  # integer ids, handed on as float64 values (the contract's arrays are floats)


def expand(template: dict, spec) -> dict:
    from parity.model.taps import expand_tap_map

    return expand_tap_map(template, spec)


def check(spec) -> None:
    """What HF's Gemma 4 classes hard-code, beyond the config (raise Unsupported naming the field)."""
    from parity.errors import Unsupported

    fixed = {"norm_unit_offset": False, "embed_scale": True, "embed_scale_dtype": "activation",
             "norm_placement": "sandwich", "qk_norm": True, "query_pre_attn_scalar": 1.0, "attn_softcap": None,
             "gelu_approximate": "tanh", "v_norm": True, "layer_scalar": True}
    for f, want in fixed.items():
        if hasattr(spec, f) and getattr(spec, f) != want:
            raise Unsupported(f"hf cannot build {f}={getattr(spec, f)!r} for Gemma 4 (Gemma4ForCausalLM hard-codes "
                              f"{want!r}); drop 'hf' from --impls for this spec")


def keep_layer_types(config, spec) -> str | None:
    """Give `config` the spec's layer types where transformers overwrote them; say what it did (None: nothing).

    `Gemma4TextConfig.__post_init__` forces the last layer to `full_attention` (with a warning). Every released
    Gemma 4 ends on a global layer, so only a truncated depth (`--first-layers`: the real model's first N
    layers) can end on a local one; transformers would then build that layer global, with the global head
    size, and compute another model than the first N layers. parity sets the layer types back, and drops the
    global head-size override transformers put on that layer, so the library computes the spec's layers with
    its own classes; the returned line goes into the run's library facts (`effective`), so the change is said.
    """
    want = ["sliding_attention" if t == "local" else "full_attention" for t in spec.layer_types]
    got = list(config.layer_types)
    if got == want:
        return None
    forced = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    config.layer_types = want
    if config.is_heterogeneous:  # the global layers' head size / KV heads, re-applied to the kept layer types
        overrides = config._heterogeneity_spec.per_layer_overrides
        config.per_layer_config = {i: dict(o) for i, o in overrides.items() if want[i] == "full_attention"}
    return (f"transformers {_version()} forces the last layer to full_attention (Gemma4TextConfig); layer(s) "
            f"{forced} set back to sliding_attention by parity, as in the spec ({spec.name})")


def _version() -> str:
    import transformers

    return transformers.__version__


def configure(config, dtype: str) -> None:
    """Eager attention (returns its probabilities) and, in float64 only, eager experts: transformers'
    default `grouped_mm` has no float64 kernel. Other dtypes keep the library's default experts path."""
    config._attn_implementation = "eager"
    if dtype == "float64" and getattr(config, "enable_moe_block", False):
        config._experts_implementation = "eager"


def scalar_buffer(name: str, twin: dict, plan, weights):
    """A layer's `layer_scalar` buffer filled from the canonical weights, in the dtype transformers gives
    that buffer when it builds the model in this dtype (the twin's); None for every other buffer."""
    if name.rpartition(".")[2] != SCALAR:
        return None
    import torch

    from parity.adapters.torch_load import numpy_view
    from parity.model.weights import fill

    like = next(b for k, b in twin.items() if k.rpartition(".")[2] == SCALAR)
    t = torch.empty(plan[name].shape, dtype=like.dtype)
    fill(weights, plan[name], numpy_view(t))
    return t


def scalar_targets(model) -> dict[str, tuple[int, ...]]:
    """The layer-scalar buffers as weight targets for map_weights (buffers are not in named_parameters)."""
    return {k: tuple(b.shape) for k, b in model.named_buffers() if k.rpartition(".")[2] == SCALAR}


@contextmanager
def observe(model, spec, out: dict, attn_reads: dict) -> Iterator[None]:
    """Every Gemma 4 tap that `recording` cannot take, filled into `out` while the model runs.

    `attn_reads` fills with layer -> (keys, values) as the library hands them to its attention function
    (after the cache update; a KV-shared layer's are its producer's tensors, the same objects).
    """
    from parity.adapters.torch_hooks import argument_taps, operand_taps, output_taps

    router = expand(ROUTER_TAPS, spec)
    watch = []
    for i, layer in enumerate(model.model.layers):
        if getattr(spec, "layer_scalar", False):
            watch.append((layer.layer_scalar, f"layers.{i}.pre_scalar"))
        if getattr(layer, "enable_moe_block", False):
            watch.append((layer.router.per_expert_scale, f"layers.{i}.moe.weights"))
    flat = frozenset([*router, *(t for _, t in watch if t.endswith("moe.weights"))])
    with ExitStack() as stack:
        stack.enter_context(argument_taps(model, expand(ARGUMENT_TAPS, spec), out))
        stack.enter_context(output_taps(model, router, out, flat=flat))
        stack.enter_context(operand_taps(watch, out, flat=flat))
        stack.enter_context(_attention_reads(attn_reads))
        yield


@contextmanager
def _attention_reads(reads: dict) -> Iterator[None]:
    """Wrap the attention function modeling_gemma4 calls (eager: its module-level `eager_attention_forward`,
    looked up at call time) to keep the key and value tensors each layer's attention receives."""
    from transformers.models.gemma4 import modeling_gemma4 as mg

    fn = mg.eager_attention_forward

    @functools.wraps(fn)
    def wrapper(module, query, key, value, *args, **kwargs):
        reads.setdefault(module.layer_idx, (key, value))
        return fn(module, query, key, value, *args, **kwargs)

    mg.eager_attention_forward = wrapper
    try:
        yield
    finally:
        mg.eager_attention_forward = fn


def kv_sources(model, reads: dict) -> dict[str, int | None]:
    """KV-shared layer -> the layer whose keys and values it read, judged by tensor identity in one forward.

    A shared layer whose tensors are no earlier layer's reads None (it computed its own or read another's).
    """
    out: dict[str, int | None] = {}
    for i, layer in enumerate(model.model.layers):
        if not layer.self_attn.is_kv_shared_layer or i not in reads:
            continue
        k, v = reads[i]
        out[str(i)] = next((j for j in range(i) if j in reads and reads[j][0] is k and reads[j][1] is v), None)
    return out


def finish(taps: dict) -> dict:
    """Integer expert ids as float64 values (sorted by descending probability, as torch.topk returns them)."""
    for tap in taps:
        if tap.endswith(INDEX_TAPS):
            taps[tap] = np.asarray(taps[tap]).astype(np.float64)
    return taps


def mask_layer(cache, spec, i: int) -> int:
    """The cache layer whose sizes build layer i's mask, chosen as transformers' mask builders choose it
    (the first sliding layer for sliding masks, `find_first_full_attention_index` for full ones): a
    KV-shared layer has a dummy cache layer of its own, and attends with its type's mask."""
    from transformers.masking_utils import find_first_full_attention_index

    if spec.layer_types[i] == "local":
        return cache.is_sliding.index(True) if True in cache.is_sliding else 0
    return find_first_full_attention_index(cache)
