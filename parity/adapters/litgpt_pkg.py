"""Adapter for the released `litgpt` package (Lightning AI), its GPT class built for Gemma 1/2/3.

The `litgpt.Config` is written from the spec's numbers, never from a preset:
litgpt's Gemma presets leave `norm_eps` at its default 1e-5 where Gemma uses
1e-6. What a field cannot say, the library's own rules decide, and those are
read back in `effective()`:

- the RMSNorm `(1 + w)` offset is on only when `"Gemma" in config.name`
  (`Config.norm_class`, 0.4.x and 0.5.x alike), so the config name carries
  "Gemma" exactly when the spec asks for the offset; `1 + w` is then computed
  in the parameter dtype (`norm-unit-offset-lowp` in bf16/fp16);
- RMSNorm computes in `x.float()`, which downcasts float64: a litgpt float64
  run is not an fp64 reference;
- the model is built as litgpt users build it: constructed in fp32 (the RoPE
  cos/sin cache is computed in fp32 at construction), weights loaded, then
  `.to(dtype)`, which also rounds the cos/sin cache buffers to that dtype
  (Fabric's `setup_module` does the same cast);
- GeGLU's GELU is an inline `F.gelu` call in `GemmaMLP.forward`: no module
  produces `mlp.act`, so during `run` only, the adapter wraps
  `torch.nn.functional.gelu` (the object litgpt looks the name up on) to
  record what the library's own call returned while `h.{i}.mlp` is running,
  and restores it afterwards. The same is done for `F.softmax`: attention
  probabilities exist only on litgpt's softcapping path (SDPA never
  materialises them), and are recorded as litgpt's fp32 softmax output,
  before its cast to the activation dtype.

Decoding (`decode`) goes through litgpt's own KV cache, set up as its
`generate()` does: `set_kv_cache(batch_size=1)`, a prefill with
`input_pos = arange(len(prompt))`, then one token per forward at its position,
with `input_pos_maxp1` (max position + 1) where the version takes it. Each
layer's cache is `attn.kv_cache.k/.v` [1, kv_heads, slots, head_dim], keys
after the qk-norm and RoPE. A global layer's slot is the position; a local
layer's cache (0.5.x) is a ring of `min(max_seq_length, window)` slots, slot =
position mod size. litgpt stores no positions: they are read off that rule.
What litgpt's cache path does wrong is reported, not repaired:

- litgpt >= 0.5.13 refuses a prefill longer than a local layer's ring (its
  #2182: the ring would overwrite keys while the mask assumes contiguous
  positions); `decode` turns that refusal into `Unsupported`, naming it;
- the cache path's mask is `build_mask_cache`'s boolean tril, and the
  attention-softcap path (Gemma 2) adds it to the scores as 0/1 instead of
  0/-inf (its #1672): a multi-token prefill through the cache is not causal,
  so every cached key and value from layer 1 on saw the whole prompt. A decode
  step's own row is all True (a uniform +1), so only the prefill is wrong.

Two generations of the package are handled, by feature detection:
0.4.x fuses q/k/v into `attn.attn` per kv group (that group's query heads,
then its key, then its value), supports Gemma 1/2 only (sliding window on all
or on even layers); 0.5.x keeps a plain [Q; K; V] stack in `attn.qkv` and
adds Gemma 3 (qk-norm, per-layer rope bases, linear rope scaling) and
per-layer sliding-window indices.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from contextlib import contextmanager

import numpy as np

from parity.adapters.base import Adapter, CacheView, DecodeResult, DecodeStep, RunResult
from parity.adapters.registry import backend_missing
from parity.formats.litgpt import FUSED, QKV_TARGET, fuse_qkv  # noqa: F401 -- the old import path of both
from parity.errors import ParityInputError, Unsupported
from parity.model.spec import GemmaSpec, gemma_layer_types
from parity.model.taps import expand_tap_map, tap_names
from parity.model.weights import Weights, map_weights

from parity.formats.litgpt import NAME_MAP_PRE, NAME_MAP_SANDWICH  # noqa: E402,F401 -- the format's names

TAP_MAP = {
    # the sqrt(n_embd) scaling is inline in GPT.forward: its result is the input of block 0
    "embed": ("transformer.h.0", "in"),
    "layers.{}.attn_norm": ("transformer.h.{}.norm_1", "out"),
    "layers.{}.attn": ("transformer.h.{}.attn", "out"),
    "layers.{}.post_attn_norm": ("transformer.h.{}.post_attention_norm", "out"),
    "layers.{}.attn_residual": ("transformer.h.{}.norm_2", "in"),
    "layers.{}.mlp_norm": ("transformer.h.{}.norm_2", "out"),
    "layers.{}.mlp.gate": ("transformer.h.{}.mlp.fc_1", "out"),
    "layers.{}.mlp.up": ("transformer.h.{}.mlp.fc_2", "out"),
    "layers.{}.mlp.hidden": ("transformer.h.{}.mlp.proj", "in"),
    "layers.{}.mlp": ("transformer.h.{}.mlp", "out"),
    "layers.{}.post_mlp_norm": ("transformer.h.{}.post_mlp_norm", "out"),
    "layers.{}.out": ("transformer.h.{}", "out"),
    "final_norm": ("transformer.ln_f", "out"),
    # logits: the model's return value, after the final softcap (an inline partial, not a module)
}
# taps that an inline torch.nn.functional call produces: tap -> (module running it, function name)
INLINE_TAPS = {
    "layers.{}.mlp.act": ("transformer.h.{}.mlp", "gelu"),
    "layers.{}.attn.probs": ("transformer.h.{}.attn", "softmax"),
}

OFFSET_NAME = "Gemma (parity)"  # litgpt turns the (1 + w) offset on when "Gemma" is in the name
NO_OFFSET_NAME = "parity, no unit offset"


def _litgpt():
    try:
        import litgpt
        import litgpt.model  # noqa: F401
    except ImportError:
        raise backend_missing("litgpt", "litgpt") from None
    return litgpt


def _config_fields() -> set[str]:
    """The Config fields of the installed litgpt: what it can express."""
    return {f.name for f in dataclasses.fields(_litgpt().Config)}


def _placing(spec: GemmaSpec) -> str | None:
    """litgpt 0.4.x `sliding_window_layer_placing` for the spec's local layers, or None if it has none."""
    local = [t == "local" for t in spec.layer_types]
    if all(local):
        return "all"
    if local == [t == "local" for t in gemma_layer_types(2, spec.num_layers)]:
        return "interleaved"
    return None


class LitgptAdapter(Adapter):
    name = "litgpt"
    decodes = True

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        import torch

        _litgpt()
        try:
            v = version("litgpt")
        except PackageNotFoundError:
            v = "?"
        return f"litgpt {v} / torch {torch.__version__}"

    def check(self, spec: GemmaSpec, dtype: str) -> None:
        fields = _config_fields()

        def refuse(field: str, why: str) -> None:
            raise ParityInputError(f"litgpt cannot build {field}={getattr(spec, field)!r}: {why}; "
                                   "drop 'litgpt' from --impls for this spec")

        if spec.embed_scale_dtype != "activation":
            refuse("embed_scale_dtype", "GPT.forward always rounds sqrt(n_embd) to the activation dtype")
        if spec.qk_norm and "norm_qk" not in fields:
            refuse("qk_norm", "this litgpt has no Config.norm_qk (Gemma 3 needs litgpt >= 0.5)")
        if spec.rope_local_base is not None and "rope_local_base_freq" not in fields:
            refuse("rope_local_base", "this litgpt has no Config.rope_local_base_freq (Gemma 3 needs litgpt >= 0.5)")
        if spec.rope_scaling_factor != 1.0:
            if "rope_adjustments" not in fields:
                refuse("rope_scaling_factor", "this litgpt has no Config.rope_adjustments (needs litgpt >= 0.5)")
            if "local" in spec.layer_types and "rope_local_base_freq" not in fields:
                refuse("rope_scaling_factor", "this litgpt would scale the local layers' rope too")
        if "local" in spec.layer_types and "sliding_window_indices" not in fields and _placing(spec) is None:
            refuse("layer_types", "this litgpt places sliding windows on all layers or on even layers only")

    def _config(self, spec: GemmaSpec):
        litgpt = _litgpt()
        fields = _config_fields()
        cfg = dict(
            name=OFFSET_NAME if spec.norm_unit_offset else NO_OFFSET_NAME,
            block_size=spec.max_position,
            n_layer=spec.num_layers,
            n_embd=spec.hidden_size,
            n_head=spec.num_heads,
            n_query_groups=spec.num_kv_heads,
            head_size=spec.head_dim,
            intermediate_size=spec.intermediate_size,  # each GeGLU half, as HF
            vocab_size=spec.vocab_size,
            padded_vocab_size=spec.vocab_size,  # no padding: logits have exactly the vocabulary
            norm_class_name="RMSNorm",
            norm_eps=spec.norm_eps,  # NOT the presets' 1e-5
            mlp_class_name="GemmaMLP",
            gelu_approximate=spec.gelu_approximate,
            parallel_residual=False,
            shared_attention_norm=False,
            bias=False,
            lm_head_bias=False,
            rotary_percentage=1.0,
            rope_base=spec.rope_base,
            rope_condense_ratio=1,
            scale_embeddings=spec.embed_scale,
            attention_scores_scalar=spec.query_pre_attn_scalar,  # None: 1/sqrt(head_size)
            attention_logit_softcapping=spec.attn_softcap,
            final_logit_softcapping=spec.final_softcap,
            post_attention_norm=spec.norm_placement == "sandwich",
            post_mlp_norm=spec.norm_placement == "sandwich",
        )
        if "attn_bias" in fields:
            cfg["attn_bias"] = False
        if "norm_qk" in fields:
            cfg["norm_qk"] = spec.qk_norm
            cfg["norm_qk_type"] = "default"  # per head, before RoPE
        if "rope_interleave" in fields:
            cfg["rope_interleave"] = False  # half-split pairs
        local = [t == "local" for t in spec.layer_types]
        if any(local):
            cfg["sliding_window_size"] = spec.sliding_window
            if "sliding_window_indices" in fields:
                cfg["sliding_window_indices"] = [int(x) for x in local]
            else:
                cfg["sliding_window_layer_placing"] = _placing(spec)
        if spec.rope_scaling_factor != 1.0:
            cfg["rope_adjustments"] = {"factor": spec.rope_scaling_factor}  # linear: divides the global theta
        if any(local) and (spec.rope_local_base is not None or spec.rope_scaling_factor != 1.0):
            # a second, unscaled rope table for the local layers (index 1)
            cfg["rope_local_base_freq"] = spec.rope_local_base or spec.rope_base
            cfg["rope_indices"] = [int(x) for x in local]
        return litgpt.Config(**cfg)

    def build(self, spec: GemmaSpec, weights: Weights, dtype: str):
        import torch

        from parity.adapters.torch_setup import configure, torch_dtype

        configure()
        litgpt = _litgpt()
        config = self._config(spec)
        model = litgpt.GPT(config)  # fp32, as litgpt constructs it; the rope cache is computed here
        params = {k: tuple(v.shape) for k, v in model.named_parameters()}
        layout = "stacked" if QKV_TARGET["stacked"].format(0) in params else "grouped"
        base = NAME_MAP_SANDWICH if spec.norm_placement == "sandwich" else NAME_MAP_PRE
        name_map = {**base, FUSED: QKV_TARGET[layout]}
        tensors = fuse_qkv(weights.tensors, spec, layout)
        if spec.tied_head:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # as convert_hf_checkpoint does
        mapped = map_weights(tensors, name_map, params, where=f"{self.name} weights")
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(torch.from_numpy(mapped[k]))
        model = model.to(torch_dtype(dtype)).eval()  # also rounds the cos/sin buffers, as Fabric's setup does
        offsets = {m.add_unit_offset for m in model.modules() if type(m).__name__ == "RMSNorm"}
        if offsets != {spec.norm_unit_offset}:
            raise ParityInputError(
                f"litgpt built RMSNorms with add_unit_offset={sorted(offsets)} from config name {config.name!r}, "
                f"but the spec asks norm_unit_offset={spec.norm_unit_offset}; this litgpt decides the offset "
                "differently: update parity/adapters/litgpt_pkg.py"
            )
        model.parity_spec = spec
        model.parity_qkv_layout = layout
        return model

    def run(self, model, tokens, feed=None) -> RunResult:
        import torch

        from parity.adapters.torch_hooks import module_feeds, recording, to_numpy

        spec = model.parity_spec
        if len(tokens) > model.max_seq_length:
            raise ParityInputError(f"prompt has {len(tokens)} tokens but the litgpt model holds "
                                   f"{model.max_seq_length} (spec max_position); shorten the prompt")
        tap_map = expand_tap_map(TAP_MAP, spec)
        inline = expand_tap_map(INLINE_TAPS, spec)
        feeds = module_feeds(tap_map, feed, "litgpt")
        with torch.no_grad(), recording(model, tap_map, feeds) as taps, \
                _inline_recording(model, inline) as inline_taps:
            logits = model(torch.tensor([tokens]))
        out = dict(taps)
        out.update(inline_taps)
        out["logits"] = to_numpy(logits)  # after the final softcap, which no module produces
        unavailable = {}
        for tap, (path, fn) in inline.items():
            if tap in out:
                continue
            if tap.endswith("attn.probs"):
                unavailable[tap] = ("litgpt ran torch SDPA (no attention softcap): the probabilities never "
                                    "exist as a tensor")
            else:
                unavailable[tap] = f"{path} made no torch.nn.functional.{fn} call (litgpt's MLP code changed?)"
        missing = [t for t in tap_names(spec) if t not in out and t not in unavailable]
        for t in missing:
            unavailable[t] = "no litgpt module produced it"
        return RunResult(out, unavailable)

    def decode(self, model, prompt, continuation) -> DecodeResult:
        """Prefill, then teacher-forced steps through litgpt's KV cache (see the module docstring)."""
        import torch

        from parity.adapters.torch_hooks import recording, to_numpy

        spec = model.parity_spec
        total = len(prompt) + len(continuation)
        if total > model.max_seq_length:
            raise ParityInputError(f"prompt and continuation have {total} tokens but the litgpt model holds "
                                   f"{model.max_seq_length} (spec max_position); decode fewer tokens")
        tap_map = expand_tap_map(TAP_MAP, spec)
        inline = expand_tap_map(INLINE_TAPS, spec)
        blocks = list(model.transformer.h)
        # input_pos_maxp1 is 0.5.x; generate() passes it unless Thunder compiled the model
        maxp1 = "input_pos_maxp1" in inspect.signature(model.forward).parameters
        param = next(model.parameters())
        steps: list[DecodeStep] = []
        unavailable: dict[str, str] = {}
        # generate() builds the cache under fabric.init_tensor(), i.e. in the model's dtype. It sets
        # model.max_seq_length to the length instead; left alone here, since resetting it rebuilds the rope
        # cache in fp32 where run() reads the table rounded to the model's dtype. Older litgpt (no such
        # parameter) sizes the cache to model.max_seq_length, which only adds masked slots.
        sized = "max_seq_length" in inspect.signature(model.set_kv_cache).parameters
        model.set_kv_cache(batch_size=1, device=param.device, dtype=param.dtype,
                           **({"max_seq_length": total} if sized else {}))
        try:
            with torch.no_grad():
                kwargs = {"input_pos_maxp1": len(prompt)} if maxp1 else {}
                try:
                    model(torch.tensor([prompt]), torch.arange(len(prompt)), **kwargs)
                except ValueError as e:
                    ring = min((b.attn.kv_cache.k.shape[2] for b in blocks
                                if getattr(b.attn.kv_cache, "is_sliding_window", False)), default=None)
                    if ring is None or len(prompt) <= ring:
                        raise
                    raise Unsupported(
                        f"litgpt refuses a {len(prompt)}-token prefill through its KV cache: a local layer's "
                        f"ring holds {ring} slots (sliding_window), and a longer prefill would overwrite slots "
                        f"its mask takes for contiguous positions (litgpt #2182; its error: "
                        f"{str(e).split('. ')[0]}); decode "
                        f"with a prompt of at most {ring} tokens, or drop 'litgpt' from --impls") from None
                for s, token in enumerate(continuation):
                    p = len(prompt) + s
                    kwargs = {"input_pos_maxp1": p + 1} if maxp1 else {}
                    with recording(model, tap_map) as taps, _inline_recording(model, inline) as inline_taps:
                        logits = model(torch.tensor([[token]]), torch.tensor([p]), **kwargs)
                    out = dict(taps)
                    out.update(inline_taps)
                    out["logits"] = to_numpy(logits)
                    cache, keys = {}, {}
                    for i, b in enumerate(blocks):
                        kv = b.attn.kv_cache
                        held = _slot_positions(p, kv.k.shape[2])  # the slots written so far
                        n = len(held)
                        cache[i] = CacheView(held, _np(kv.k[0, :, :n]), _np(kv.v[0, :, :n]))
                        probs = out.get(f"layers.{i}.attn.probs")
                        if probs is not None:
                            # the keys attention read: `held` slots, or (no input_pos_maxp1) every slot of a
                            # global cache, the unwritten ones masked
                            L = probs.shape[-1]
                            keys[i] = held if L == n else np.arange(L)
                    steps.append(DecodeStep(taps=out, cache=cache, key_positions=keys))
        finally:
            model.clear_kv_cache()
        for tap, (path, fn) in inline.items():
            if steps and tap not in steps[0].taps:
                unavailable[tap] = ("litgpt ran torch SDPA (no attention softcap): the probabilities never "
                                    "exist as a tensor" if tap.endswith("attn.probs") else
                                    f"{path} made no torch.nn.functional.{fn} call while decoding")
        return DecodeResult(steps, unavailable)

    def effective(self, model) -> dict:
        """Read off the built model: its Config (litgpt's only setting of most numbers), its modules and buffers."""
        import torch

        import litgpt.config

        from parity.model.effective import GELU_PROBE, Unread, gelu_kind, report

        cfg = model.config
        blocks = list(model.transformer.h)
        norm = blocks[0].norm_1
        pdtype = norm.weight.dtype
        name = lambda d: str(d).replace("torch.", "")  # noqa: E731
        norm_rule = inspect.getsource(litgpt.config.Config.norm_class.fget)
        mlp_src = inspect.getsource(type(blocks[0].mlp).forward)
        attn = [b.attn for b in blocks]
        windows = [cfg.sliding_window_size if getattr(a, "apply_sliding_window_attention", False) else None
                   for a in attn]
        rope_indices = getattr(cfg, "rope_indices", None)
        local_base = getattr(cfg, "rope_local_base_freq", None)
        local = [bool(local_base is not None and rope_indices and rope_indices[i]) for i in range(cfg.n_layer)]
        adj = getattr(cfg, "rope_adjustments", None) or {}
        factor = (float(adj.get("factor", 1.0)) if set(adj) <= {"factor"}  # linear scaling: one number
                  else Unread(f"rope_adjustments {adj} (not linear scaling)"))
        scale = torch.tensor(cfg.n_embd ** 0.5, dtype=pdtype) if cfg.scale_embeddings else None
        qk = getattr(attn[0], "norm_q", None)
        act = torch.nn.functional.gelu(torch.tensor(GELU_PROBE), approximate=cfg.gelu_approximate).tolist()
        return report({
            "vocab_size": model.transformer.wte.num_embeddings,
            "hidden_size": model.transformer.wte.embedding_dim,
            "intermediate_size": blocks[0].mlp.fc_1.out_features,
            "num_layers": len(blocks),
            "num_heads": cfg.n_head,
            "num_kv_heads": cfg.n_query_groups,
            "head_dim": cfg.head_size,
            "norm_unit_offset": bool(norm.add_unit_offset),
            "norm_placement": "sandwich" if type(blocks[0].post_attention_norm).__name__ == "RMSNorm" else "pre",
            "norm_eps": float(norm.eps),
            "final_norm": type(model.transformer.ln_f).__name__ == "RMSNorm",
            "gelu_approximate": gelu_kind(act),  # what torch computes for the approximate= GemmaMLP passes
            "geglu": "gate" if "gelu(x_fc_1" in mlp_src else "up" if "gelu(x_fc_2" in mlp_src
            else "not recognised in litgpt's GemmaMLP.forward",
            "embed_scale": float(scale) if scale is not None else 1.0,
            "embed_scale_dtype": "activation",  # torch.tensor(sqrt(n_embd), dtype=x.dtype) in GPT.forward
            "tied_head": _same_tensor(model.lm_head.weight, model.transformer.wte.weight),  # litgpt holds a copy
            "query_scale": [1.0 / math.sqrt(cfg.attention_scores_scalar or cfg.head_size)] * len(blocks),
            "rope_base": [float(local_base if lo else cfg.rope_base) for lo in local],
            "rope_scaling_factor": factor if isinstance(factor, Unread) else [1.0 if lo else factor for lo in local],
            "attn_softcap": [cfg.attention_logit_softcapping] * len(blocks),
            "final_softcap": cfg.final_logit_softcapping,
            "sliding_window": windows,
            "qk_norm": qk is not None,
        }, {
            "config_name": cfg.name,
            "activation": f"F.gelu(approximate={cfg.gelu_approximate!r}), torch's kernel: fp32 inside, rounded once",
            "norm": (f"{'(1 + w) in ' + name(pdtype) if norm.add_unit_offset else 'w'}, normalised in "
                     f"{'fp32 (x.float(): downcasts float64)' if pdtype == torch.float64 else 'fp32'}, "
                     "cast after multiply"),
            "norm_offset_rule": ('"Gemma" in config.name' if '"Gemma" in self.name' in norm_rule
                                 else "see litgpt Config.norm_class"),
            "embed_scale": None if scale is None else f"{float(scale):.6g} in {name(scale.dtype)}",
            "qk_norm": None if qk is None else f"RMSNorm over head_size before RoPE, eps {qk.eps}",
            "rope_adjustments": getattr(cfg, "rope_adjustments", None),
            "rope_cache": f"cos/sin computed in fp32 at construction, stored as {name(model.cos.dtype)} "
                          f"(shape {tuple(model.cos.shape)})",
            "attention": ("eager q@k in activation dtype, softcap, softmax in fp32"
                          if cfg.attention_logit_softcapping is not None else "torch SDPA"),
            "lm_head": "own parameter holding a copy of the embedding" if model.parity_spec.tied_head
                       else "own parameter",
            "qkv_layout": {"stacked": "attn.qkv: [Q; K; V]",
                           "grouped": "attn.attn: per kv group q heads, k, v"}[model.parity_qkv_layout],
        })

    def release(self, model) -> None:
        del model



def _same_tensor(a, b) -> bool:
    """Whether two parameters hold the same numbers (a head that copies the embedding computes as a tied one)."""
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def _slot_positions(p: int, size: int) -> np.ndarray:
    """The position each written slot holds after position p, slot = position mod size.

    A global cache (size > p) gives 0..p; a wrapped ring gives, per slot, the
    latest position that mapped to it: litgpt's KVCache writes `input_pos % max_cache_len`.
    """
    slots = np.arange(min(p + 1, size))
    return p - (p - slots) % size


def _np(t) -> np.ndarray:
    import torch

    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32).cpu().numpy().copy()


@contextmanager
def _inline_recording(model, inline: dict[str, tuple[str, str]]):
    """Record what litgpt's own inline torch.nn.functional calls return, per module, during one run.

    inline: tap -> (module path, function name). While that module runs, the
    first call of the function is the tap. The function is wrapped on the
    torch.nn.functional module object (litgpt's `F`), and restored on exit.
    """
    import torch.nn.functional as F

    from parity.adapters.torch_hooks import to_numpy

    modules = dict(model.named_modules())
    out: dict[str, np.ndarray] = {}
    active: list[str] = []  # module paths now running, innermost last
    wanted = {(path, fn): tap for tap, (path, fn) in inline.items()}
    handles = []
    def enter(path):
        def pre(mod, args):
            active.append(path)  # a hook returning a value would replace the input: return None

        return pre

    def leave(mod, args, output):
        active.pop()  # likewise, returning the popped path would replace the module's output

    for path in sorted({p for p, _ in wanted}):
        handles.append(modules[path].register_forward_pre_hook(enter(path)))
        handles.append(modules[path].register_forward_hook(leave, always_call=True))
    originals = {fn: getattr(F, fn) for fn in {fn for _, fn in wanted}}

    def wrap(fn, orig):
        def recorded(*args, **kwargs):
            y = orig(*args, **kwargs)
            tap = wanted.get((active[-1], fn)) if active else None
            if tap is not None and tap not in out:
                out[tap] = to_numpy(y)
            return y

        return recorded

    try:
        for fn, orig in originals.items():
            setattr(F, fn, wrap(fn, orig))
        yield out
    finally:
        for fn, orig in originals.items():
            setattr(F, fn, orig)
        for h in handles:
            h.remove()
