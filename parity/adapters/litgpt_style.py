"""Adapter for the project's own lit-gpt-style port (parity.litgpt_style)."""

from __future__ import annotations

import numpy as np

from parity.adapters.base import Adapter, CacheView, DecodeResult, DecodeStep, RunResult
from parity.formats.litgpt import FUSED, qkv_rows
from parity.model.spec import GemmaSpec
from parity.model.taps import expand_tap_map
from parity.model.weights import Part, Weights, fill, map_weights, parts

# canonical (HF) name -> port name; `{}` is the layer index
NAME_MAP_PRE = {
    "model.embed_tokens.weight": "wte.weight",
    "model.layers.{}.input_layernorm.weight": "h.{}.norm_1.weight",
    "model.layers.{}.self_attn.qkv.weight": "h.{}.attn.attn.weight",  # fused from q, k, v below
    "model.layers.{}.self_attn.o_proj.weight": "h.{}.attn.proj.weight",
    "model.layers.{}.self_attn.q_norm.weight": "h.{}.attn.norm_q.weight",
    "model.layers.{}.self_attn.k_norm.weight": "h.{}.attn.norm_k.weight",
    "model.layers.{}.post_attention_layernorm.weight": "h.{}.norm_2.weight",  # Gemma 1: the pre-MLP norm
    "model.layers.{}.mlp.gate_proj.weight": "h.{}.mlp.fc_1.weight",
    "model.layers.{}.mlp.up_proj.weight": "h.{}.mlp.fc_2.weight",
    "model.layers.{}.mlp.down_proj.weight": "h.{}.mlp.proj.weight",
    "model.norm.weight": "ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
NAME_MAP_SANDWICH = {
    **NAME_MAP_PRE,
    "model.layers.{}.post_attention_layernorm.weight": "h.{}.post_attention_norm.weight",  # Gemma 2/3: after attn
    "model.layers.{}.pre_feedforward_layernorm.weight": "h.{}.norm_2.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "h.{}.post_mlp_norm.weight",
}

# Gemma 4 (family 4): separate q/k/v (per-layer shapes, K=V and KV-shared layers leave some out), no fusing
NAME_MAP_GEMMA4 = {
    **{k: v for k, v in NAME_MAP_SANDWICH.items() if "qkv" not in k},
    "model.layers.{}.self_attn.q_proj.weight": "h.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "h.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "h.{}.attn.v_proj.weight",
    "model.embed_tokens_per_layer.weight": "ple.ple_embed.weight",
    "model.per_layer_model_projection.weight": "ple.ple_proj.weight",
    "model.per_layer_projection_norm.weight": "ple.ple_norm.weight",
    "model.layers.{}.router.scale": "h.{}.router.scale",
    "model.layers.{}.router.proj.weight": "h.{}.router.proj.weight",
    "model.layers.{}.router.per_expert_scale": "h.{}.router.per_expert_scale",
    "model.layers.{}.experts.gate_up_proj": "h.{}.experts.gate_up_proj",
    "model.layers.{}.experts.down_proj": "h.{}.experts.down_proj",
    "model.layers.{}.post_feedforward_layernorm_1.weight": "h.{}.post_dense_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm_2.weight": "h.{}.norm_moe.weight",
    "model.layers.{}.post_feedforward_layernorm_2.weight": "h.{}.post_moe_norm.weight",
    "model.layers.{}.per_layer_input_gate.weight": "h.{}.ple_gate.weight",
    "model.layers.{}.per_layer_projection.weight": "h.{}.ple_up.weight",
    "model.layers.{}.post_per_layer_input_norm.weight": "h.{}.post_ple_norm.weight",
    "model.layers.{}.layer_scalar": "h.{}.layer_scalar",
}

TAP_MAP = {
    "embed": ("embed_scale", "out"),
    "layers.{}.attn_norm": ("h.{}.norm_1", "out"),
    "rope.cos": ("rope_cos", "out"),
    "layers.{}.attn.scores": ("h.{}.attn.scores", "out"),
    "layers.{}.attn.probs": ("h.{}.attn.probs", "out"),
    "layers.{}.attn": ("h.{}.attn", "out"),
    "layers.{}.post_attn_norm": ("h.{}.post_attention_norm", "out"),
    "layers.{}.attn_residual": ("h.{}.norm_2", "in"),
    "layers.{}.mlp_norm": ("h.{}.norm_2", "out"),
    "layers.{}.mlp.gate": ("h.{}.mlp.fc_1", "out"),
    "layers.{}.mlp.up": ("h.{}.mlp.fc_2", "out"),
    "layers.{}.mlp.act": ("h.{}.mlp.act", "out"),
    "layers.{}.mlp.hidden": ("h.{}.mlp.proj", "in"),
    "layers.{}.mlp": ("h.{}.mlp", "out"),
    "layers.{}.post_mlp_norm": ("h.{}.post_mlp_norm", "out"),
    "layers.{}.out": ("h.{}", "out"),
    # Gemma 4
    "layers.{}.per_layer_input": ("h.{}.ple_in", "out"),
    "layers.{}.dense_branch": ("h.{}.dense_tap", "out"),
    "layers.{}.moe.router_logits": ("h.{}.router.logits", "out"),
    "layers.{}.moe.router_probs": ("h.{}.router.probs", "out"),
    "layers.{}.moe.experts": ("h.{}.router.chosen", "out"),
    "layers.{}.moe.weights": ("h.{}.router.weights", "out"),
    "layers.{}.moe_branch": ("h.{}.moe_tap", "out"),
    "layers.{}.ple": ("h.{}.post_ple_norm", "out"),
    "layers.{}.pre_scalar": ("h.{}.pre_scalar", "out"),
    "final_norm": ("ln_f", "out"),
    "logits": ("final_softcap", "out"),
}


def _np(t) -> np.ndarray:
    import torch

    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32).numpy().copy()


def fuse_qkv_parts(plan: dict[str, Part], spec: GemmaSpec, stacked: bool = False) -> dict[str, Part]:
    """Replace each layer's q, k, v with litgpt's fused layout (parity.formats.litgpt), each used once.

    The port reads the grouped layout; `stacked` loads a plain [Q; K; V] instead (the qkv-order fault).
    """
    out = dict(plan)
    rows = qkv_rows(spec, "stacked" if stacked else "grouped")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}.self_attn."
        src = {n: out.pop(p + n + "_proj.weight") for n in "qkv"}
        pieces = tuple((src[w].pieces[0][0], r, n) for w, r, n in rows)
        out[FUSED.format(i)] = Part((sum(n for _, _, n in rows), src["q"].shape[1]), pieces)
    return out


def fuse_qkv(tensors: dict[str, np.ndarray], spec: GemmaSpec) -> dict[str, np.ndarray]:
    """The fused layout as arrays (for tests and converters)."""
    w = Weights(spec, tensors)
    return {k: fill(w, part, np.empty(part.shape, np.float32)) for k, part in fuse_qkv_parts(parts(w), spec).items()}


class LitgptStyleAdapter(Adapter):
    name = "litgpt-style"
    decodes = True
    full_cache_taps = True  # run(..., cache_taps=True) gives the keys and values a cache must hold

    def __init__(self, options=None, spec_changes: dict | None = None, name: str | None = None,
                 qkv_stacked: bool = False) -> None:
        # options: parity.adapters.port_model.PortOptions (None = the correct port); spec_changes: fields
        # built differently from the requested spec. Both exist to build deliberately wrong
        # variants (the diagnosis's counterfactuals, the fault-injection suite).
        self.options = options
        self.spec_changes = dict(spec_changes or {})
        self.qkv_stacked = qkv_stacked  # qkv-order: load q, k, v as a plain [Q; K; V] stack
        if name:
            self.name = name

    def version(self) -> str:
        import parity

        return f"parity {parity.__version__}"

    def check(self, spec: GemmaSpec, dtype: str) -> None:
        pass  # the port implements every field of the spec, in every dtype

    def build(self, spec: GemmaSpec, weights: Weights, dtype: str):
        import torch

        from parity.adapters.torch_load import load
        from parity.adapters.torch_setup import torch_dtype
        from parity.adapters.port_model import GPT, PortOptions

        if self.spec_changes:
            spec = spec.replace(**self.spec_changes)
        with torch.device("meta"):  # no storage, no random init: the weights are written once, below
            model = GPT(spec, self.options or PortOptions())
        params = {k: tuple(v.shape) for k, v in model.named_parameters()}
        if spec.family == 4:
            plan = map_weights(parts(weights), NAME_MAP_GEMMA4, params, where=f"{self.name} weights")
        else:
            name_map = NAME_MAP_SANDWICH if spec.norm_placement == "sandwich" else NAME_MAP_PRE
            plan = map_weights(fuse_qkv_parts(parts(weights), spec, self.qkv_stacked), name_map, params,
                               where=f"{self.name} weights")
        dt = torch_dtype(dtype)
        load(model, plan, weights, dt, [f"h.{i}" for i in range(spec.num_layers)])
        return model.eval()

    def run(self, model, tokens, feed=None, cache_taps: bool = False) -> RunResult:
        """`cache_taps`: also each layer's keys and values as a cache would hold them (`layers.{i}.cache.k`,
        `.cache.v`, [T, kv, hd]), the ground truth of a decode run's cache contents (parity.capture.decode)."""
        import torch

        from parity.adapters.torch_hooks import module_feeds, recording

        tap_map = expand_tap_map(TAP_MAP, model.s)
        if model.opts.softcap_on_norm:  # the cap runs before the head: the logits are the head's output
            tap_map["logits"] = ("logits_tap", "out")
        if cache_taps:
            for i in range(model.s.num_layers):  # a KV-shared layer's cache is its source's
                src = model.s.kv_source(i)
                tap_map[f"layers.{i}.cache.k"] = (f"h.{src}.attn.k_rot", "out")
                tap_map[f"layers.{i}.cache.v"] = (f"h.{src}.attn.v_out", "out")
        feeds = module_feeds(tap_map, feed, "litgpt-style")
        with torch.no_grad(), recording(model, tap_map, feeds) as taps:
            model(torch.tensor([tokens]))
        taps = dict(taps)
        for t in [t for t in taps if ".cache." in t]:
            taps[t] = taps[t].transpose(1, 0, 2)  # [kv, T, hd] -> [T, kv, hd]: one row per position
        return RunResult(taps)

    def decode(self, model, prompt, continuation) -> DecodeResult:
        """The port's own KV cache (parity.adapters.port_model.KVCache: local layers in a ring of `window` slots)."""
        import torch

        from parity.adapters.port_model import KVCache
        from parity.adapters.torch_hooks import recording

        tap_map = expand_tap_map(TAP_MAP, model.s)
        if model.opts.softcap_on_norm:
            tap_map["logits"] = ("logits_tap", "out")
        cache = KVCache(model.s, model.opts)
        steps = []
        with torch.no_grad():
            model(torch.tensor([prompt]), cache)
            for token in continuation:
                with recording(model, tap_map) as taps:
                    model(torch.tensor([[token]]), cache)
                layers = cache.layers
                steps.append(DecodeStep(
                    taps=dict(taps),
                    cache={i: CacheView(c.pos.numpy().copy(), _np(c.k[0]), _np(c.v[0])) for i, c in enumerate(layers)},
                    key_positions={i: c.key_positions.numpy().copy() for i, c in enumerate(layers)},
                ))
        return DecodeResult(steps)

    def effective(self, model) -> dict:
        """Read off the built port: its modules, and the spec it holds (the port's only setting of the
        per-layer attention numbers)."""
        import torch

        from parity.adapters.port_model import SkippedNorm
        from parity.model.effective import GELU_PROBE, gelu_kind, report

        s, o = model.s, model.opts
        b0 = model.h[0]
        act = b0.mlp.act
        gelu = act(torch.tensor(GELU_PROBE, dtype=torch.float64)) if not o.gelu_lowp else None
        wdt = model.wte.weight.dtype
        es = model.embed_scale
        scale_dt = torch.promote_types(wdt, torch.float32) if es.in_fp32 else wdt  # in_fp32: a Python float
        post = not isinstance(b0.post_attention_norm, torch.nn.Identity)
        name = lambda d: str(d).replace("torch.", "")  # noqa: E731
        out = report({
            "vocab_size": model.wte.num_embeddings,
            "hidden_size": model.wte.embedding_dim,
            "intermediate_size": b0.mlp.fc_1.out_features,
            "num_layers": len(model.h),
            "num_heads": s.num_heads,
            "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "norm_unit_offset": b0.norm_1.unit_offset,
            "norm_placement": "sandwich" if post else "pre",
            "norm_eps": float(b0.norm_1.eps),
            "final_norm": not isinstance(model.ln_f, SkippedNorm),
            "gelu_approximate": gelu_kind(gelu) if gelu is not None else "tanh",  # GeluOpByOp: tanh by its formula
            "geglu": "up" if b0.mlp.swapped else "gate",
            "embed_scale": float(torch.tensor(es.normalizer, dtype=scale_dt)),
            "embed_scale_dtype": "float32" if es.in_fp32 else "activation",
            "tied_head": model.lm_head.weight is model.wte.weight,
            "query_scale": [s.query_scale] * s.num_layers,
            "rope_base": [s.rope_base_for(i) for i in range(s.num_layers)],
            "rope_scaling_factor": [s.rope_scaling_factor if o.rope_scaling_local else s.rope_factor_for(i)
                                    for i in range(s.num_layers)],
            "attn_softcap": [s.attn_softcap] * s.num_layers,
            "final_softcap": s.final_softcap,
            "sliding_window": [s.window_for(i) for i in range(s.num_layers)],
            "qk_norm": not isinstance(b0.attn.norm_q, torch.nn.Identity),
        }, {
            "class": type(model).__name__ + " (parity's port)",
            "activation": ("tanh op by op in the activation dtype" if o.gelu_lowp
                           else "nn.GELU: computed in fp32 or wider, rounded once"),
            "norm": f"{'(1 + w)' if s.norm_unit_offset else 'w'} in "
                    f"{'param dtype' if o.offset_lowp else 'fp32 or wider'}, cast {o.norm_cast} multiply",
            "embed_scale": f"{es.normalizer:.6g} rounded to {name(scale_dt)}",
            "rope": f"{o.rope_layout}, angles in {'activation dtype' if o.rope_lowp else 'fp32 or wider'}",
            "softmax": "activation dtype, op by op" if o.softmax_lowp else "fp32 or wider",
            "qk_norm": ("weights held, not applied" if o.skip_qk_norm else
                        "after RoPE" if o.qk_norm_after_rope else "before RoPE") if s.qk_norm else "none",
            **(self._gemma4(s, o) if s.family == 4 else {}),
            **({"kv_cache_type": o.decode_kv_quant} if o.decode_kv_quant else {}),  # declared: kv-cache-precision
        })
        if s.family == 4:  # G4.md: which layer's K/V each shared layer reads; the rest are library facts
            out["kv_source"] = {str(i): s.kv_source(i) for i in range(s.num_layers) if s.kv_source(i) != i}
            out["library"].update(
                head_dims=[s.head_dim_for(i) for i in range(s.num_layers)],
                kv_heads=[s.kv_heads_for(i) for i in range(s.num_layers)],
                rope_global=(f"ordinary partial ({s.rope_proportion} of the head)" if o.rope_ordinary_partial
                             else f"proportional ({s.rope_proportion})") if s.rope_proportion < 1 else "full")
            if o.float32_islands:
                out["library"]["float32_islands"] = "norms, rope angles, softmax and embed scales in float32 (as HF)"
        return out

    @staticmethod
    def _gemma4(s, o) -> dict:
        """Gemma 4's per-layer facts (library facts: parity.model.effective has no property for them yet)."""
        out = {
            "kv_source": {str(i): s.kv_source(i) for i in range(s.num_layers) if s.kv_source(i) != i},
            "head_dim_per_layer": [s.head_dim_for(i) for i in range(s.num_layers)],
            "kv_heads_per_layer": [s.kv_heads_for(i) for i in range(s.num_layers)],
            "rope_global": (f"ordinary partial ({s.rope_proportion} of the head)" if o.rope_ordinary_partial
                            else f"proportional ({s.rope_proportion})") if s.rope_proportion < 1 else "full",
        }
        if o.float32_islands:
            out["float32_islands"] = "norms, rope angles, softmax and embed scales in float32 (as HF)"
        return out

