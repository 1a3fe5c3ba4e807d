"""Adapter for HuggingFace transformers' Gemma, Gemma 2, Gemma 3 and Gemma 4 (text) causal LMs.

Gemma 4's weight names, taps and observations live in adapters/hf_gemma4.py; this module drives the
build, the run and the decode loop for every family.

The model is built the way `from_pretrained(dtype=...)` builds it: parameters
created in the target dtype while buffers computed at init (RoPE inv_freq)
stay fp32. Casting a built fp32 model with `.to(bfloat16)` would also round
inv_freq, itself a `rope-precision` divergence, so it is never done here.
Attention is eager: the SDPA path silently drops Gemma 2's attention softcap.

Decoding goes through transformers' own incremental path: the cache class
`generate()` builds for the model (`DynamicCache(config=...)`, or with
`cache="static"` the `StaticCache` of `generate(cache_implementation="static")`;
both give Gemma 2/3's local layers their sliding-window layer class) and the
inputs `generate()`'s own `prepare_inputs_for_generation` makes each step.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

from parity.adapters.base import Adapter, CacheView, DecodeResult, DecodeStep, RunResult
from parity.adapters.registry import backend_missing
from parity.errors import ParityInputError, Unsupported
from parity.model.spec import GemmaSpec, to_hf_config
from parity.model.taps import expand_tap_map
from parity.model.weights import Weights, map_weights, parts

# canonical names are HF names: the map is the identity, kept literal so the
# every-tensor-used-once check runs like every other adapter's
NAME_MAP = {k: k for k in (
    "model.embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.self_attn.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight",
    "model.layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)}

_COMMON_TAPS = {
    "embed": ("model.embed_tokens", "out"),  # GemmaTextScaledWordEmbedding applies sqrt(hidden) itself
    "layers.{}.attn_norm": ("model.layers.{}.input_layernorm", "out"),
    "layers.{}.attn.probs": ("model.layers.{}.self_attn", "out1"),  # eager attention returns its weights
    "layers.{}.attn": ("model.layers.{}.self_attn", "out"),
    "layers.{}.mlp.gate": ("model.layers.{}.mlp.gate_proj", "out"),
    "layers.{}.mlp.up": ("model.layers.{}.mlp.up_proj", "out"),
    "layers.{}.mlp.act": ("model.layers.{}.mlp.act_fn", "out"),
    "layers.{}.mlp.hidden": ("model.layers.{}.mlp.down_proj", "in"),
    "layers.{}.mlp": ("model.layers.{}.mlp", "out"),
    "layers.{}.out": ("model.layers.{}", "out"),
    "final_norm": ("model.norm", "out"),
}
# Gemma 1: post_attention_layernorm is the PRE-MLP norm
TAP_MAP_GEMMA1 = {
    **_COMMON_TAPS,
    "layers.{}.attn_residual": ("model.layers.{}.post_attention_layernorm", "in"),
    "layers.{}.mlp_norm": ("model.layers.{}.post_attention_layernorm", "out"),
}
# Gemma 2/3: post_attention_layernorm is AFTER attention; pre_feedforward_layernorm is pre-MLP
TAP_MAP_SANDWICH = {
    **_COMMON_TAPS,
    "layers.{}.post_attn_norm": ("model.layers.{}.post_attention_layernorm", "out"),
    "layers.{}.attn_residual": ("model.layers.{}.pre_feedforward_layernorm", "in"),
    "layers.{}.mlp_norm": ("model.layers.{}.pre_feedforward_layernorm", "out"),
    "layers.{}.post_mlp_norm": ("model.layers.{}.post_feedforward_layernorm", "out"),
}
CLASSES = {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM", 4: "Gemma4ForCausalLM"}


CACHES = ("dynamic", "static")
DECODE_MIN = "5.3"  # `prepare_inputs_for_generation(next_sequence_length=)` (not in 5.0-5.2); docs/versions.md


class HFAdapter(Adapter):
    name = "hf"
    decodes = True
    cache = "dynamic"  # a class default too: subclasses that set their own name skip __init__
    _scales_in_embedding = True

    def __init__(self, cache: str = "dynamic") -> None:
        # cache: the KV cache `decode` goes through, as generate(cache_implementation=...) names it
        if cache not in CACHES:
            raise ParityInputError(f"hf: unknown cache {cache!r}; use one of {', '.join(CACHES)}")
        self.cache = cache
        if cache != "dynamic":
            self.name = f"hf-{cache}"

    def version(self) -> str:
        import torch
        import transformers

        return f"transformers {transformers.__version__} / torch {torch.__version__}"

    def check(self, spec: GemmaSpec, dtype: str) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise backend_missing(self.name, "transformers") from None
        if spec.family == 4:
            self._check_gemma4(spec)
            return
        fixed = {  # what HF's Gemma classes hard-code; a spec asking otherwise cannot be built here
            "norm_unit_offset": True, "embed_scale": True, "embed_scale_dtype": "activation",
            "norm_placement": "pre" if spec.family == 1 else "sandwich",
            "qk_norm": spec.family == 3,
        }
        for f, want in fixed.items():
            if getattr(spec, f) != want:
                raise Unsupported(
                    f"hf cannot build {f}={getattr(spec, f)!r} for Gemma {spec.family} (it hard-codes {want!r}); "
                    "drop 'hf' from --impls for this spec"
                )
        if spec.family == 1 and spec.gelu_approximate != "tanh":
            # GemmaConfig rewrites hidden_act="gelu" to gelu_pytorch_tanh, so the build would lie
            raise Unsupported(
                "hf cannot build gelu_approximate='none' for Gemma 1: GemmaConfig rewrites hidden_act "
                "'gelu' to 'gelu_pytorch_tanh'; drop 'hf' from --impls for this spec"
            )
        try:  # transformers validates its configs (e.g. hidden_size divisible by heads for Gemma 2)
            self._config(spec)
        except Exception as e:  # huggingface_hub's validation errors are not ValueErrors
            msg = str(e).strip().splitlines()[-1].strip()
            raise Unsupported(f"hf refuses this spec: {msg}; drop 'hf' from --impls for it") from None
        if spec.family == 1 and (spec.query_pre_attn_scalar or spec.rope_scaling_factor != 1.0):
            raise Unsupported("hf Gemma 1 has no query_pre_attn_scalar or rope scaling; drop 'hf' from --impls")

    def _check_gemma4(self, spec: GemmaSpec) -> None:
        import transformers

        if not hasattr(transformers, CLASSES[4]):
            raise Unsupported(f"hf: transformers {transformers.__version__} has no Gemma 4 ({CLASSES[4]}); "
                              "install transformers >= 5.5, or drop 'hf' from --impls")
        from parity.adapters import hf_gemma4

        hf_gemma4.check(spec)
        try:
            self._config(spec)
        except Exception as e:  # noqa: BLE001 -- transformers' config validation raises several kinds
            msg = str(e).strip().splitlines()[-1].strip()
            raise Unsupported(f"hf refuses this spec: {msg}; drop 'hf' from --impls for it") from None

    def _config(self, spec: GemmaSpec):
        import transformers

        cfg = to_hf_config(spec)
        cfg.pop("parity", None)
        cfg.pop("architectures", None)
        model_type = cfg.pop("model_type")
        cls = transformers.AutoConfig.for_model(model_type, **cfg).__class__
        config = cls(**cfg)
        config._attn_implementation = "eager"
        if spec.family == 4:
            from parity.adapters import hf_gemma4

            note = hf_gemma4.keep_layer_types(config, spec)
            if note:  # only then: config.json written from this config stays as transformers writes it
                config.parity_layer_types_note = note
        return config

    def build(self, spec: GemmaSpec, weights: Weights, dtype: str):
        import torch
        import transformers

        from parity.adapters.torch_load import load
        from parity.adapters.torch_setup import torch_dtype

        config = self._config(spec)
        g4 = spec.family == 4
        if g4:
            from parity.adapters import hf_gemma4

            hf_gemma4.configure(config, dtype)
        model_cls = getattr(transformers, CLASSES[spec.family])
        with torch.device("meta"):  # no storage, no random init: the weights are written once, below
            model = self._from_config(model_cls, config, dtype)
        params = {k: tuple(v.shape) for k, v in model.named_parameters()}  # tied head listed once
        if g4:  # Gemma 4's layer scalar is a buffer in transformers and a weight in parity
            params.update(hf_gemma4.scalar_targets(model))
        plan = map_weights(parts(weights), {**NAME_MAP, **{k: k for k in hf_gemma4.NAMES}} if g4 else NAME_MAP, params,
                           where=f"{self.name} weights")
        dt = torch_dtype(dtype)
        load(model, plan, weights, dt, [f"model.layers.{i}" for i in range(spec.num_layers)])
        own = functools.partial(hf_gemma4.scalar_buffer, plan=plan, weights=weights) if g4 else None
        self._init_buffers(model, model_cls, spec, dtype, own)
        model.eval()
        model.parity_spec = spec
        self._scales_in_embedding = hasattr(model.model.embed_tokens, "embed_scale")
        return model

    @staticmethod
    def _from_config(model_cls, config, dtype: str):
        from parity.adapters.torch_setup import torch_dtype

        try:
            return model_cls._from_config(config, dtype=torch_dtype(dtype), attn_implementation="eager")
        except TypeError:  # transformers 4.x calls it torch_dtype
            return model_cls._from_config(config, torch_dtype=torch_dtype(dtype), attn_implementation="eager")

    def _init_buffers(self, model, model_cls, spec: GemmaSpec, dtype: str, own=None) -> None:
        """Buffers computed at init (RoPE inv_freq, the embedding scale) from a small twin built for real.

        The twin has the same config but one head, one layer of each type and a
        tiny vocabulary and MLP, which the buffers do not depend on, so
        transformers' own code computes them, in this version's way, without the
        full-size random init; a buffer the twin lacks is an error, not a guess. `own(name, twin)` gives
        a buffer that is a weight (Gemma 4's layer scalar), or None for one the twin computes.
        """
        import torch

        types = tuple(dict.fromkeys(spec.layer_types))  # one layer of each type: the buffers are per model
        small = dict(vocab_size=16, intermediate_size=8, num_heads=1, num_kv_heads=1,
                     num_layers=len(types), layer_types=types)
        if spec.family == 4:  # no sharing (it needs more layers); PLE and experts kept small, not dropped
            small.update(num_kv_shared_layers=0, double_wide_mlp=False, ple_vocab_size=None,
                         num_global_kv_heads=1 if spec.num_global_kv_heads else None,
                         expert_intermediate_size=min(spec.expert_intermediate_size, 8))
        twin = dict(self._from_config(model_cls, self._config(spec.replace(**small)), dtype).named_buffers())
        for name, buf in model.named_buffers():
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            mine = own(name, twin) if own is not None else None
            if mine is not None:
                mod.register_buffer(attr, mine, persistent=attr not in mod._non_persistent_buffers_set)
                continue
            if name not in twin or twin[name].shape != buf.shape:
                raise RuntimeError(f"hf: buffer {name!r} {tuple(buf.shape)} has no twin to compute it from; "
                                   "this transformers builds buffers parity does not know: update adapters/hf.py")
            persistent = attr not in mod._non_persistent_buffers_set
            mod.register_buffer(attr, twin[name].clone(), persistent=persistent)
        if any(b.is_meta for b in model.buffers()):
            raise RuntimeError("hf: a buffer is still on the meta device after the build; update adapters/hf.py")

    def _tap_map(self, spec: GemmaSpec, model=None):
        if spec.family == 4:
            from parity.adapters import hf_gemma4

            return hf_gemma4.expand(hf_gemma4.TAP_MAP, spec)
        taps = expand_tap_map(TAP_MAP_GEMMA1 if spec.family == 1 else TAP_MAP_SANDWICH, spec)
        # read from the model when given, not this adapter: the suite decodes with a fresh adapter the model
        # another built (the embed tap was wrong on transformers 5.3)
        scales = self._scales_in_embedding if model is None else hasattr(model.model.embed_tokens, "embed_scale")
        if not scales:
            # transformers before ~5.5 scales by sqrt(hidden) inline in GemmaModel.forward
            taps["embed"] = ("model.layers.0", "in")
        if spec.family < 3:  # one rotary table for every layer; Gemma 3 computes one per layer type
            taps["rope.cos"] = ("model.rotary_emb", "out")
        return taps

    def run(self, model, tokens, feed=None) -> RunResult:
        import torch

        from parity.adapters.torch_hooks import module_feeds, recording, to_numpy

        spec = model.parity_spec
        tap_map = self._tap_map(spec, model)
        reads: dict = {}
        with torch.no_grad(), recording(model, tap_map, module_feeds(tap_map, feed, "hf")) as taps, \
                self._observe(model, taps, reads):
            out = model(input_ids=torch.tensor([tokens]), use_cache=False)
        taps = dict(taps)
        taps["logits"] = to_numpy(out.logits)  # after the final softcap, which no module produces
        if spec.family == 4:
            from parity.adapters import hf_gemma4

            hf_gemma4.finish(taps)
            if feed is None:  # what the cumulative forward's shared layers read: reported by effective()
                model.parity_kv_source = hf_gemma4.kv_sources(model, reads)
        return RunResult(taps)

    @staticmethod
    def _observe(model, taps: dict, reads: dict):
        """Gemma 4's taps that no module hook gives (hf_gemma4.observe); nothing for Gemma 1-3."""
        from contextlib import nullcontext

        if model.parity_spec.family != 4:
            return nullcontext()
        from parity.adapters import hf_gemma4

        return hf_gemma4.observe(model, model.parity_spec, taps, reads)

    def new_cache(self, model, max_len: int):
        """The cache `generate()` builds for this model (`_prepare_cache_for_generation`), empty.

        `max_len` sizes a static cache as generate does for this many positions (its max_length - 1).
        """
        import transformers

        config = model.config.get_text_config(decoder=True)
        if self.cache == "static":
            return transformers.StaticCache(config=config, max_cache_len=max_len)
        return transformers.DynamicCache(config=config)

    def decode(self, model, prompt, continuation) -> DecodeResult:
        """Prefill, then one forward per token, with the inputs generate()'s own loop gives the model.

        `prepare_inputs_for_generation` slices the ids to the new token, forwards the cache and the
        position ids, and for a static cache builds the per-layer-type 4D masks ahead of the forward,
        as `generate()` does; the position ids grow by one per step as `_update_model_kwargs_for_generation`
        grows them, from the prompt's `arange` (an all-ones attention mask's cumsum - 1, which generate
        then drops).
        """
        import torch

        from parity.adapters.torch_hooks import recording, to_numpy

        prepare = model.prepare_inputs_for_generation
        params = inspect.signature(prepare).parameters
        if "next_sequence_length" not in params:
            import transformers

            # the registry's version check refuses this up front; kept for a direct caller
            raise RuntimeError(f"hf decode drives generate()'s step inputs as transformers >= {DECODE_MIN} makes "
                               f"them; transformers {transformers.__version__} makes them differently: upgrade it")
        spec = model.parity_spec
        tap_map = self._tap_map(spec, model)
        cache = self.new_cache(model, len(prompt) + len(continuation))
        read = _record_reads(cache)
        kwargs = _generate_kwargs(params, cache, len(prompt))
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # generate asks for the last row only
        ids = torch.tensor([prompt])
        steps = []
        with torch.no_grad():
            model(**prepare(ids, is_first_iteration=True, **kwargs), return_dict=True)
            for token in continuation:
                p = ids.shape[1]
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
                _grow(kwargs)
                inputs = prepare(ids, next_sequence_length=1, **kwargs)
                # the positions each layer's mask gives its keys, read before the step as the mask is built
                mask_of = self._mask_layers(cache, spec)  # a KV-shared layer attends with its type's mask
                key_positions = {i: _mask_positions(cache.layers[mask_of[i]], p) for i in range(len(cache.layers))}
                read.clear()
                attn_reads: dict = {}
                with recording(model, tap_map) as taps, self._observe(model, taps, attn_reads):
                    out = model(**inputs, return_dict=True)
                taps = dict(taps)
                taps["logits"] = to_numpy(out.logits)
                views = {}
                for i, layer in enumerate(cache.layers):
                    if mask_of[i] == i or i in read:
                        views[i] = _cache_view(layer, read.get(i), key_positions[i])
                    else:  # KV-shared: no cache of its own; the keys and values its attention was handed
                        views[i] = _read_view(attn_reads[i], key_positions[i])
                if spec.family == 4:
                    from parity.adapters import hf_gemma4

                    hf_gemma4.finish(taps)
                steps.append(DecodeStep(taps=taps, cache=views, key_positions=key_positions))
        return DecodeResult(steps)

    @staticmethod
    def _mask_layers(cache, spec: GemmaSpec) -> dict[int, int]:
        """layer -> the cache layer its attention mask is sized from (itself, but Gemma 4's KV-shared layers)."""
        if spec.family != 4:
            return {i: i for i in range(len(cache.layers))}
        from parity.adapters import hf_gemma4

        return {i: i if type(layer).__name__ != "DummyLayer" else hf_gemma4.mask_layer(cache, spec, i)
                for i, layer in enumerate(cache.layers)}

    def effective(self, model) -> dict:
        """Read off the built model: module attributes, buffers, and a few calls on tiny inputs (the norm
        offset, the GELU, which projection it gates)."""
        import torch

        from parity.model.effective import GELU_PROBE, NOT_A_SETTING, Unread, gelu_kind, report, rope_from_inv_freq

        m, cfg = model.model, model.config
        layer0, emb = m.layers[0], m.embed_tokens
        attn = [layer.self_attn for layer in m.layers]
        hd = attn[0].head_dim
        name = lambda d: str(d).replace("torch.", "")  # noqa: E731
        scale = getattr(emb, "embed_scale", None)
        if scale is not None:  # a buffer in transformers 5, a plain float in 4.x
            scale = torch.as_tensor(scale).to(emb.weight.dtype)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(m.layers)
        rope = []
        for t in types:  # Gemma 3 keeps one set of frequencies per layer type, Gemma 1/2 one for all
            inv = getattr(m.rotary_emb, f"{t}_inv_freq", None)
            rope.append(rope_from_inv_freq((inv if inv is not None else m.rotary_emb.inv_freq).tolist()))
        with torch.no_grad():
            act = layer0.mlp.act_fn(torch.tensor(GELU_PROBE, dtype=torch.float32)).tolist()
        # layers that stream their weights (PARITY_STREAM) hold them only while they run: not observed here
        streamed = (Unread("the layers stream their weights (PARITY_STREAM): not observed outside a forward")
                    if layer0.input_layernorm.weight.is_meta else None)
        out = report({
            "vocab_size": emb.num_embeddings,
            "hidden_size": emb.embedding_dim,
            "intermediate_size": layer0.mlp.gate_proj.out_features,
            "num_layers": len(m.layers),
            "num_heads": attn[0].q_proj.out_features // hd,
            "num_kv_heads": attn[0].k_proj.out_features // hd,
            "head_dim": hd,
            "norm_unit_offset": _norm_offset(layer0.input_layernorm) if not streamed else streamed,
            "norm_placement": "sandwich" if hasattr(layer0, "post_feedforward_layernorm") else "pre",
            "norm_eps": float(getattr(layer0.input_layernorm, "eps", None)
                              or layer0.input_layernorm.variance_epsilon),  # Gemma 4's name for it
            "final_norm": isinstance(getattr(m, "norm", None), torch.nn.Module),
            "gelu_approximate": gelu_kind(act),
            "geglu": _gelu_input(layer0.mlp) if not streamed else streamed,
            "embed_scale": float(scale) if scale is not None else NOT_A_SETTING,
            "embed_scale_dtype": ("activation" if scale.dtype == emb.weight.dtype else name(scale.dtype))
            if scale is not None else NOT_A_SETTING,
            "tied_head": model.lm_head.weight.shape == emb.weight.shape and bool(torch.equal(model.lm_head.weight,
                                                                                           emb.weight)),
            "query_scale": [float(a.scaling) for a in attn],
            "rope_base": [b for b, _ in rope],
            "rope_scaling_factor": [f for _, f in rope],
            "attn_softcap": [getattr(a, "attn_logit_softcapping", None) for a in attn],
            "final_softcap": getattr(cfg, "final_logit_softcapping", None),
            "sliding_window": [getattr(a, "sliding_window", None) for a in attn],
            "qk_norm": hasattr(attn[0], "q_norm"),
        }, {
            "class": f"{type(model).__name__} / {type(layer0.mlp.act_fn).__name__}",
            "embed_scale": f"{float(scale):.6g} in {name(scale.dtype)}" if scale is not None
            else "sqrt(hidden) applied inline in the model's forward (this transformers version)",
            "rope_inv_freq_dtype": {k: name(b.dtype) for k, b in m.named_buffers() if k.endswith("inv_freq")},
            "rope_parameters": getattr(cfg, "rope_parameters", None),
            "attn_implementation": cfg._attn_implementation,
            "kv_cache": self._cache_layout(model),
            **({"kv_source": getattr(model, "parity_kv_source", None)} if model.parity_spec.family == 4 else {}),
            **({"layer_types": note} if (note := getattr(cfg, "parity_layer_types_note", None)) else {}),
        })
        if model.parity_spec.family == 4:  # G4.md: which layer's K/V each shared layer reads, beside the properties
            out["kv_source"] = out["library"]["kv_source"]
        return out

    def _cache_layout(self, model) -> str:
        """The cache class decode builds and its layer class per layer type, from an empty one built as decode
        builds it (a local layer given a full-length class would show here)."""
        from transformers import cache_utils

        if not hasattr(cache_utils, "DynamicLayer"):  # before the per-layer caches (~4.54): decode refuses too
            return f"no per-layer cache in this transformers (decode needs transformers>={DECODE_MIN})"
        cache = self.new_cache(model, 1)  # the classes do not depend on the length
        kinds: dict[str, set] = {}
        for kind, layer in zip(model.parity_spec.layer_types, cache.layers):
            kinds.setdefault(kind, set()).add(type(layer).__name__)
        return f"{type(cache).__name__} (" + ", ".join(f"{k}: {'/'.join(sorted(v))}" for k, v in kinds.items()) + ")"

    def release(self, model) -> None:
        del model


def _record_reads(cache) -> dict:
    """layer -> the (keys, values) the cache's `update` returns while the model runs: what attention reads.

    Wraps this one cache object's `update` (an instance attribute, no class is patched), so whatever the
    library's layer classes do, patched or not, is what is recorded.
    """
    reads: dict = {}
    update = cache.update

    def recorded(key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = update(key_states, value_states, layer_idx, *args, **kwargs)
        reads[layer_idx] = (keys, values)
        return keys, values

    cache.update = recorded
    return reads


def _float(t) -> np.ndarray:
    import torch

    t = t.detach()
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).cpu().numpy().copy()


def _generate_kwargs(params, cache, n: int) -> dict:
    """The model kwargs generate() hands `prepare_inputs_for_generation` for an n-token prompt, in the names
    this transformers' `prepare` takes (`params`: its signature's parameters).

    Two generations of the API, told apart by that signature rather than by version number:
    - `cache`, no `cache_position` (transformers ~5.5 on): generate drops an all-ones attention mask
      (`attention_mask=None`) and `prepare` builds a static cache's 4D masks from none;
    - `past_key_values` and `cache_position` (5.0-5.4; 5.3 is the `[litgpt]` extra's): generate keeps the
      all-ones 2D mask and grows it and `cache_position` by one per step, and `prepare` builds a static cache's
      4D masks only from that 2D mask.
    The position ids are the all-ones mask's cumsum - 1 either way, i.e. the prompt's `arange`.
    """
    import torch

    kwargs = {"position_ids": torch.arange(n)[None], "use_cache": True, "attention_mask": None}
    if "cache" in params:
        kwargs["cache"] = cache
    else:
        kwargs["past_key_values"] = cache
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(n)  # [n]
        kwargs["attention_mask"] = torch.ones(1, n, dtype=torch.long)  # [batch 1, n]
    return kwargs


def _grow(kwargs: dict) -> None:
    """One new token, as generate's `_update_model_kwargs_for_generation` grows its kwargs."""
    import torch

    pos = kwargs["position_ids"]
    kwargs["position_ids"] = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    if kwargs.get("attention_mask") is not None:
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    if kwargs.get("cache_position") is not None:
        cp = kwargs["cache_position"]
        kwargs["cache_position"] = torch.cat([cp, cp[-1:] + 1])


def _mask_sizes(layer, p: int) -> tuple[int, int]:
    """The layer's (kv_length, kv_offset) for a one-token step at position p, however this transformers asks.

    `get_mask_sizes` took the step's `cache_position` tensor (its length the query length) up to ~5.4 and
    takes the query length as an int after (transformers PR #40907 and successors); the parameter's name says
    which, so no version string is compared.
    """
    import torch

    first = next(iter(inspect.signature(layer.get_mask_sizes).parameters), None)
    arg = torch.arange(p, p + 1) if first == "cache_position" else 1  # [1]: the step's one query position
    kv_length, kv_offset = layer.get_mask_sizes(arg)
    return int(kv_length), int(kv_offset)


def _mask_positions(layer, p: int) -> np.ndarray:
    """The absolute positions of the keys a one-token step at position p attends to, as the layer reports
    them to the mask builder (`get_mask_sizes`: key j is position kv_offset + j); a static layer's slots past
    p are not written yet (zeros, masked) and read -1."""
    kv_length, kv_offset = _mask_sizes(layer, p)
    pos = np.arange(int(kv_offset), int(kv_offset) + int(kv_length), dtype=np.int64)
    pos[pos > p] = -1
    return pos


def _stored_positions(layer) -> np.ndarray:
    """The absolute position each slot of a layer's `keys` holds, from the layer's own count of positions seen.

    Dynamic layers append and a sliding one keeps the newest (window - 1) in order, so its n entries are the
    last n positions. Static layers write position i to slot i; a full static sliding layer rolls its slots
    left and writes the newest last (not a ring), so it also holds the last n positions, oldest first.
    """
    from transformers.cache_utils import StaticLayer

    n = layer.keys.shape[-2]
    seen = int(layer.get_seq_length())  # the sliding layers' cumulative count, not their stored length
    if isinstance(layer, StaticLayer):
        pos = np.arange(n, dtype=np.int64) + max(seen - n, 0)
        pos[pos >= seen] = -1  # not written yet
        return pos
    return np.arange(seen - n, seen, dtype=np.int64)


def _read_view(read, key_positions: np.ndarray) -> CacheView:
    """A KV-shared layer's view: the keys and values its attention read this step ([1, kv, L, hd]), at the
    positions its mask gives those L keys; a length that disagrees with the mask is the library's error."""
    k, v = _float(read[0][0]), _float(read[1][0])
    if k.shape[1] != len(key_positions):
        raise RuntimeError(f"hf: a KV-shared layer read {k.shape[1]} keys but its mask covers {len(key_positions)} "
                           "positions; this transformers shares K/V in a way parity does not know: update adapters/hf.py")
    return CacheView(np.asarray(key_positions), k, v)


def _cache_view(layer, read, key_positions: np.ndarray) -> CacheView:
    """What the layer holds after the step, plus the entries the step read that the layer has since dropped.

    HF's dynamic sliding layer keeps only window - 1 entries, dropping the oldest one as soon as the
    step has read it; that entry is taken from what `update` returned to attention, so the view still
    has every position the step saw.
    """
    pos, k, v = _stored_positions(layer), _float(layer.keys[0]), _float(layer.values[0])
    if read is not None and read[0].shape[-2] == len(key_positions):
        held = set(pos.tolist())
        gone = [j for j, q in enumerate(key_positions.tolist()) if q >= 0 and q not in held]
        if gone:
            pos = np.concatenate([key_positions[gone], pos])
            k = np.concatenate([_float(read[0][0][:, gone]), k], axis=1)
            v = np.concatenate([_float(read[1][0][:, gone]), v], axis=1)
    return CacheView(pos, k, v)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def tokenize(text: str, directory: str) -> list[int] | None:
    """The checkpoint's own tokenizer on `text`; None when the directory has no tokenizer files (then
    prompts fall back to bytes, as for random weights). Files that are there but do not load are bad
    input, not a silent fallback to byte ids."""
    from pathlib import Path

    if not any((Path(directory) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        from parity.adapters.offline import offline

        with offline():  # local_files_only covers the files; offline also the library's own look-ups
            tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever the tokenizer library raises on a broken file
        raise ParityInputError(f"{directory}: its tokenizer files do not load ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); fix them, or give --tokens") from None
    return list(tok(text)["input_ids"])


def _norm_offset(norm) -> bool:
    """Whether an RMSNorm multiplies by (1 + w): its output on an all-ones row is (1 + w) or w, observed."""
    import torch

    w = norm.weight.detach().double()
    with torch.no_grad():
        y = norm(torch.ones((1, 1, w.shape[0]), dtype=norm.weight.dtype)).double()[0, 0]
    return bool((y - (1 + w)).abs().max() < (y - w).abs().max())


def _gelu_input(mlp) -> str:
    """"gate" or "up": which projection's output the GELU received in one call on a random row."""
    import torch

    seen = {}
    hook = mlp.act_fn.register_forward_hook(lambda mod, args, out: seen.setdefault("in", args[0]))
    try:
        x = torch.randn((1, 1, mlp.gate_proj.in_features), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            x = x.to(mlp.gate_proj.weight.dtype)
            mlp(x)
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    finally:
        hook.remove()
    got = seen.get("in")
    return "gate" if got is not None and torch.equal(got, gate) else "up" if got is not None and torch.equal(got, up) \
        else "neither"
