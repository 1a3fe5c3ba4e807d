"""Gemma 4 through mlx-lm's own `gemma4_text` classes: taps, what stays unreachable, and what is read back.

What mlx-lm 0.32.2's `mlx_lm/models/gemma4_text.py` computes (read from its source; checked against the port
and HF on the same weights by tests/test_mlx_gemma4.py):

- The decoder layer returns `(h, (keys, values), offset)` and takes its per-layer input as the keyword
  `per_layer_input`; attention returns `(out, (keys, values), offset)`. A KV-shared layer is handed its
  source's `(keys, values)` tuple (`Gemma4TextModel.previous_kvs`: the last non-shared layer of its type),
  the same objects, so which layer it reads is judged by identity (`kv_sources`).
- The MLP calls `geglu(gate, up)`, an `mx.compile`d `gelu_approx(gate) * up`: the activation alone is never
  an array (`mlp.act` unavailable); the product is the down projection's input.
- The router normalises with `mx.fast.rms_norm(x, scale * hidden**-0.5)`, projects, takes the top k of the
  logits (`mx.argpartition`: unordered) and calls `mx.softmax` on those k logits only, which equals HF's
  softmax over all E renormalised over the top k; the probabilities over all E never exist. Its
  `mx.softmax` output is `moe.weights` (before `per_expert_scale`); the chosen ids and their weights are put
  in descending order of weight, the contract's order (torch.topk's), a permutation of mlx's own values.
- `h * self.layer_scalar` is the block's last step: recorded by operand (recording.operand_taps).
- Attention is `mx.fast.scaled_dot_product_attention` (scale 1.0); RoPE is `nn.RoPE` on local layers and
  `ProportionalRoPE` (mx.fast.rope with explicit periods, inf past the rotated share) on global ones.
- Caches: `make_cache` builds a RotatingKVCache(max_size=sliding_window) per non-shared local layer and a
  KVCache per non-shared global one; KV-shared layers have none (the model pads the list with None).
"""

from __future__ import annotations

from parity.errors import Unsupported
from parity.model.taps import order_experts

_L = "model.layers.{}"
TAP_MAP = {
    "embed": (_L.format(0), "in"),  # sqrt(hidden) applied inline in Gemma4TextModel.__call__: layer 0's input
    "layers.{}.per_layer_input": (_L, "kw:per_layer_input"),
    "layers.{}.attn_norm": (_L + ".input_layernorm", "out"),
    "layers.{}.attn": (_L + ".self_attn", "out0"),
    "layers.{}.post_attn_norm": (_L + ".post_attention_layernorm", "out"),
    "layers.{}.attn_residual": (_L + ".pre_feedforward_layernorm", "in"),
    "layers.{}.mlp_norm": (_L + ".pre_feedforward_layernorm", "out"),
    "layers.{}.mlp.gate": (_L + ".mlp.gate_proj", "out"),
    "layers.{}.mlp.up": (_L + ".mlp.up_proj", "out"),
    "layers.{}.mlp.hidden": (_L + ".mlp.down_proj", "in"),
    "layers.{}.mlp": (_L + ".mlp", "out"),
    "layers.{}.dense_branch": (_L + ".post_feedforward_layernorm_1", "out"),
    "layers.{}.moe.router_logits": (_L + ".router.proj", "out"),
    "layers.{}.moe.experts": (_L + ".router", "out0"),
    "layers.{}.moe.weights": (_L + ":softmax", "out"),  # the router's mx.softmax over the top-k logits
    "layers.{}.moe_branch": (_L + ".post_feedforward_layernorm_2", "out"),
    "layers.{}.post_mlp_norm": (_L + ".post_feedforward_layernorm", "out"),
    "layers.{}.ple": (_L + ".post_per_layer_input_norm", "out"),
    "layers.{}.out": (_L, "out0"),
    "final_norm": ("model.norm", "out"),
}
KV_OBJECTS = "layers.{}.kv"  # attention's (keys, values) tuple, kept as objects for kv_sources
GEGLU_FUSED = ("mlx-lm's gemma4_text.geglu is one mx.compile'd function, gelu_approx(gate) * up: the activation "
               "alone is never an array")
ALL_PROBS = ("mlx-lm's gemma4_text.Router softmaxes only the top-k logits (mx.softmax over [T, k]); the "
             "probabilities over all experts never exist")
NO_SCALAR = ("layer {i} never multiplied anything by its layer_scalar parameter in this forward (mlx-lm's "
             "`h * self.layer_scalar`): no operand to record")
FUSED_ATTENTION = ("mlx-lm's gemma4_text.Attention calls mx.fast.scaled_dot_product_attention, one fused kernel: "
                   "the scores and probabilities never exist as arrays")


def check(spec) -> None:
    """What mlx-lm's Gemma 4 classes hard-code beyond ModelArgs (raise Unsupported naming the field)."""
    fixed = {"norm_unit_offset": False, "embed_scale": True, "norm_placement": "sandwich", "qk_norm": True,
             "query_pre_attn_scalar": 1.0, "attn_softcap": None, "gelu_approximate": "tanh", "v_norm": True,
             "layer_scalar": True}
    for f, want in fixed.items():
        if hasattr(spec, f) and getattr(spec, f) != want:
            raise Unsupported(f"mlx cannot build {f}={getattr(spec, f)!r} for Gemma 4 (mlx-lm's gemma4_text "
                              f"hard-codes {want!r}); drop 'mlx' from --impls for this spec")
    if getattr(spec, "embed_scale_dtype", "activation") != "activation":
        raise Unsupported(f"mlx cannot build embed_scale_dtype={spec.embed_scale_dtype!r} for Gemma 4 (mlx-lm "
                          "multiplies by a Python float, cast to the activation dtype); drop 'mlx' from --impls")
    if not spec.tied_head:
        raise Unsupported("mlx: parity writes Gemma 4 with a tied head only; drop 'mlx' from --impls for an untied "
                          "spec")


def tap_map(spec) -> dict[str, tuple[str, str]]:
    from parity.model.taps import expand_tap_map

    template = dict(TAP_MAP)
    taps = expand_tap_map(template, spec)
    for i in range(spec.num_layers):
        taps[KV_OBJECTS.format(i)] = (_L.format(i) + ".self_attn", "obj1")
    return taps


def inline():
    """The inline functions recorded inside a layer: the router's mx.softmax (the only softmax Gemma 4 calls;
    attention's is inside the fused kernel)."""
    import mlx.core as mx

    return {"softmax": (mx, ["softmax"], "out")}


def scalar_watch(model) -> list:
    return [(layer.layer_scalar, f"layers.{i}.pre_scalar") for i, layer in enumerate(model.model.layers)]


def finish(taps: dict, spec) -> dict:
    """Expert ids and weights in the contract's order (parity.model.taps.order_experts)."""
    return order_experts(taps, spec.num_layers)


def unavailable(spec, taps: dict) -> dict[str, str]:
    out = {}
    for i in range(spec.num_layers):
        out[f"layers.{i}.mlp.act"] = GEGLU_FUSED
        out[f"layers.{i}.attn.scores"] = FUSED_ATTENTION
        out[f"layers.{i}.attn.probs"] = FUSED_ATTENTION
        if spec.num_experts:
            out[f"layers.{i}.moe.router_probs"] = ALL_PROBS
        out[f"layers.{i}.pre_scalar"] = NO_SCALAR.format(i=i)
    return {t: r for t, r in out.items() if t not in taps}


def kv_sources(model, objects: dict) -> dict[str, int | None]:
    """KV-shared layer -> the layer whose (keys, values) its attention was handed, judged by identity in one
    forward; None where they are no earlier layer's."""
    out: dict[str, int | None] = {}
    layers = model.model.layers
    kv = {i: objects.get(KV_OBJECTS.format(i)) for i in range(len(layers))}
    for i, layer in enumerate(layers):
        if layer.self_attn.has_kv or kv[i] is None:
            continue
        k, v = kv[i]
        out[str(i)] = next((j for j in range(i) if kv[j] is not None and kv[j][0] is k and kv[j][1] is v), None)
    return out
