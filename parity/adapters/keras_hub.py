"""Adapter for keras-hub's Gemma 1, Gemma 2 and Gemma 3 (text).

Gemma 1 and 2 are one keras-hub class, `keras_hub.models.GemmaBackbone` (+
`GemmaCausalLM`), with Gemma 2 switched on by its options; Gemma 3 text is
`keras_hub.models.Gemma3Backbone` (+ `Gemma3CausalLM`) with no vision encoder.
`spec.family` picks the class (1, 2: GemmaBackbone; 3: Gemma3Backbone); every
number comes from the spec's fields.

keras and keras-hub are imported inside the methods, after KERAS_BACKEND is
set: one process runs one keras backend, so `keras-jax` and `keras-torch`
need separate processes (separate report runs).

Taps are recorded while keras-hub runs its own eager forward pass: each
sub-layer instance used gets its `call` wrapped for the duration of `run()`
(record the input/output, call the original unchanged), and the GeGLU's
GELU, which both decoder blocks evaluate inline as
`keras.activations.gelu(x1, approximate=True)`, is recorded by wrapping the
`gelu` attribute of the `keras.activations` module that the block's module
looks up at call time. Nothing here re-computes the glue between sub-layers.
Sandwich norms are sub-layers too: `post_attn_norm` is the output of the
block's `post_attention_norm`, `post_mlp_norm` of its `post_ffw_norm`, and
`attn_residual` is the input of `pre_ffw_norm` (x + post-normed attention).

Decoding (`decode`) runs keras-hub's incremental path as `generate()` does:
`_build_cache` prefills a buffer of the prompt followed by pad ids, then one
eager `call_with_cache(token, cache, p)` per continuation token, recorded by
the same wrappers as `run`. keras-hub's cache is a dense buffer with one slot
per position on every layer (local layers too: the sliding window is a mask,
`_mask_sliding_window` sliced at `cache_update_index`), so the cache views are
slots 0..p read straight out of it, keys un-permuted from GemmaBackbone's
interleaved post-RoPE layout to half-split.

What the installed keras-hub (0.32) does, read from its source
(keras_hub/src/models/gemma/, gemma3/) and read back from the built layers
(`_differences`, `effective`):

Both families
- RMSNormalization computes in float32 whatever the dtype (so a float64 model
  would be downcast there), multiplies by `(1 + scale)` in float32 and casts
  the product to the compute dtype once. Embeddings are scaled by
  `x * ops.cast(ops.sqrt(hidden_dim), x.dtype)`: the normaliser is rounded to
  the activation dtype (9.8125 for sqrt(96) in bf16).
- The decoder blocks are built without the backbone's `layer_norm_epsilon`:
  their norms (and Gemma 3's q/k norms) always use 1e-6; only the final norm
  gets it. A spec with another epsilon is refused.
- The decoder blocks build their attention with `query_head_dim_normalize=True`
  whatever the backbone was given: the option is stored on the block and
  dropped. The adapter asks for what the spec needs (False for
  query_pre_attn_scalar = hidden / heads, as 27B) and the built model scales
  q by 1/sqrt(head_dim) anyway, in the compute dtype, before q.k: the report
  shows it (cause `query-scale`) rather than the adapter refusing it. A
  scalar that is neither head_dim nor hidden // heads has no keras-hub
  option and is refused.
- Attention-logit softcap `tanh(x / cap) * cap` on the scores (after the q
  scaling, in the compute dtype), then the float32 `keras.layers.Softmax`
  (recorded as the `attn.probs` tap, before keras-hub casts it to the compute
  dtype). On GPU keras-hub takes a fused `ops.dot_product_attention` path
  only without a softcap (Gemma 1, Gemma 3), on TPU also with one; then no
  probabilities exist. The final softcap is `ReversibleEmbedding`'s
  `logit_soft_cap`, inside `token_embedding(x, reverse=True)` (the tied
  head), so the `logits` tap includes it, as the CausalLM graph computes it.
- Sliding window: `_mask_sliding_window` keeps key j for query i when
  |i - j| <= window - 1, and'ed with the causal mask: i - j < window, the HF
  definition. Which layers are local is fixed by the backbone: GemmaBackbone
  `i % 2 == 0` (even layers), Gemma3Backbone `i % 6 < 5` (five local, one
  global); other patterns are refused (field layer_types).
- Post norms: `use_post_attention_norm`, `use_post_ffw_norm` (sandwich);
  both classes can also be built pre-norm only.

GemmaBackbone (Gemma 1, 2)
- `intermediate_dim` is the width of BOTH GeGLU halves together: each of
  `ffw_gating` (gate) and `ffw_gating_2` (up) has `intermediate_dim // 2`
  outputs, so it is 2 x HF `intermediate_size` (its HF converter does the same).
- RoPE: `CachedGemmaAttention` hard-codes `RotaryEmbedding(max_wavelength=10_000)`
  (no scaling, no option). Positions and inverse frequencies are float32,
  cos/sin are cast to the compute dtype. The rotation is half-split (as
  HF/reference), after which q and k are permuted into interleaved order
  ([a0, b0, a1, b1, ...] from halves a, b). Scores are unchanged, so only
  post-RoPE q/k taps (not produced here) would need un-permuting.
- No q/k norm (a spec with qk_norm is refused).

Gemma3Backbone (Gemma 3 text)
- `gate_dim_reduction=1`: `intermediate_dim` is HF `intermediate_size`.
- RoPE bases are hard-coded per layer: 10_000 on local (sliding) layers,
  1_000_000 on global ones (with no sliding window at all, every layer is
  global: 1e6); `local_rope_scaling_factor` / `global_rope_scaling_factor`
  are linear (inverse frequencies divided by the factor, = HF's positions /
  factor). Half-split, no permutation. Other bases are refused.
- `use_query_key_norm`: an RMSNormalization over head_dim on q and on k
  (`(1 + w)`, float32, eps 1e-6) after the projections and before RoPE.
- In float16 the block clips the residual stream to +-65504.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from parity.adapters.base import DTYPES, Adapter, CacheView, DecodeResult, DecodeStep, RunResult
from parity.errors import BackendMissing, ParityInputError, Unsupported
from parity.formats.keras_hub import (  # noqa: F401 -- NAME_MAP* and to_keras_layout: this module's public names
    NAME_MAP,
    NAME_MAP_SANDWICH,
    QK_NORM_MAP,
    backbone_kwargs,
    inexpressible,
    name_map,
    query_scalar,
    to_keras_layout,
)
from parity.formats.keras_hub import to_layout as keras_layout
from parity.spec import GemmaSpec
from parity.taps import expand_tap_map, layer_of, tap_names
from parity.weights import Weights, map_weights

BACKENDS = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}  # keras backend -> pip package
DEFAULT_BACKEND = "jax"

# Pseudo-paths that are not keras layers:
GELU = "gelu"  # decoder_block_{}/gelu: the inline keras.activations.gelu call in the decoder block's call
REVERSE = ":reverse"  # token_embedding:reverse: the tied output projection, token_embedding(x, reverse=True)
COS = ":cos"  # <rope layer>:cos: the cos table its _compute_cos_sin_embedding returns (first call: q's)

# canonical tap -> (keras layer path, "in" | "out"); `{}` is the layer index
TAP_MAP = {
    "embed": ("decoder_block_0", "in"),  # x * cast(sqrt(hidden), x.dtype), done in the backbone's graph
    # layer 0's rotary cos table as RotaryEmbedding computes it (fp32 angles, cast to the compute dtype),
    # [1, T, 1, head_dim] recorded as [T, head_dim]
    "rope.cos": ("decoder_block_0/attention/.rope_layer" + COS, "out"),
    "layers.{}.attn_norm": ("decoder_block_{}/pre_attention_norm", "out"),
    # attention internals: the float32 Softmax layer's output, before keras-hub casts it to the compute
    # dtype; `.softmax` is an attribute (the layer's auto-generated name varies). [kv, group, T, S] is
    # recorded as [heads, T, S] (head = kv * group_size + group, as HF/litgpt repeat kv heads)
    "layers.{}.attn.probs": ("decoder_block_{}/attention/.softmax", "out"),
    "layers.{}.attn": ("decoder_block_{}/attention", "out"),
    "layers.{}.post_attn_norm": ("decoder_block_{}/post_attention_norm", "out"),  # sandwich only
    "layers.{}.attn_residual": ("decoder_block_{}/pre_ffw_norm", "in"),  # x + (post-normed) attention
    "layers.{}.mlp_norm": ("decoder_block_{}/pre_ffw_norm", "out"),
    "layers.{}.mlp.gate": ("decoder_block_{}/ffw_gating", "out"),
    "layers.{}.mlp.up": ("decoder_block_{}/ffw_gating_2", "out"),
    "layers.{}.mlp.act": ("decoder_block_{}/" + GELU, "out"),
    "layers.{}.mlp.hidden": ("decoder_block_{}/ffw_linear", "in"),
    "layers.{}.mlp": ("decoder_block_{}/ffw_linear", "out"),
    "layers.{}.post_mlp_norm": ("decoder_block_{}/post_ffw_norm", "out"),  # sandwich only
    "layers.{}.out": ("decoder_block_{}", "out"),
    "final_norm": ("final_normalization", "out"),
    "logits": ("token_embedding" + REVERSE, "out"),  # includes the final softcap (ReversibleEmbedding's)
}

# Isolated mode: tap -> the layer(s) whose first input the fed array replaces.
# The MLP is inline in the decoder block's call, so "the MLP's input" enters
# through both input projections. A one-path entry (mlp.gate) wins over a
# several-path one (mlp) for the same layer. Taps produced by glue (embed,
# attn_residual, mlp.hidden) cannot be fed.
FEED_MAP = {
    "layers.{}.attn_norm": ("decoder_block_{}/pre_attention_norm",),
    "layers.{}.attn": ("decoder_block_{}/attention",),
    "layers.{}.post_attn_norm": ("decoder_block_{}/post_attention_norm",),
    "layers.{}.mlp_norm": ("decoder_block_{}/pre_ffw_norm",),
    "layers.{}.mlp": ("decoder_block_{}/ffw_gating", "decoder_block_{}/ffw_gating_2"),
    "layers.{}.mlp.gate": ("decoder_block_{}/ffw_gating",),
    "layers.{}.mlp.up": ("decoder_block_{}/ffw_gating_2",),
    "layers.{}.mlp.act": ("decoder_block_{}/" + GELU,),
    "layers.{}.post_mlp_norm": ("decoder_block_{}/post_ffw_norm",),
    "layers.{}.out": ("decoder_block_{}",),
    "final_norm": ("final_normalization",),
    "logits": ("token_embedding" + REVERSE,),
}


@dataclass(frozen=True)
class _Planned:
    """A canonical tensor as keras will hold it: its keras shape, for `map_weights`, read only when assigned."""

    name: str
    shape: tuple[int, ...]


@dataclass
class KerasModel:
    """What `build` returns: the keras objects and what `run`/`effective` need."""

    spec: GemmaSpec
    dtype: str
    backend: str
    backbone: Any
    lm: Any  # GemmaCausalLM / Gemma3CausalLM(backbone, preprocessor=None): its output is the logits
    requested: dict = field(default_factory=dict)  # the backbone's keyword arguments, from the spec
    differences: dict = field(default_factory=dict)  # spec field -> what the built layers do instead
    observed: dict = field(default_factory=dict)  # what the last run saw of the GELU call (for effective)
    clean: dict = field(default_factory=dict)  # what the last unfed run saw, with block 0's attention call order


class KerasAdapter(Adapter):
    def __init__(self, backend: str | None = None) -> None:
        if backend is not None and backend not in BACKENDS:
            raise ParityInputError(
                f"keras backend {backend!r} is not one of {sorted(BACKENDS)}; use keras-jax or keras-torch"
            )
        self.backend = backend or DEFAULT_BACKEND
        self.name = "keras" if backend is None else f"keras-{backend}"

    def needs_own_process(self) -> bool:
        """keras reads its backend once per process: another backend already loaded means a subprocess."""
        keras = sys.modules.get("keras")
        return keras is not None and keras.config.backend() != self.backend

    # ------------------------------------------------------------- set-up
    def version(self) -> str:
        def v(pkg: str) -> str | None:
            try:
                return metadata.version(pkg)
            except metadata.PackageNotFoundError:
                return None

        hub = f"keras-hub {v('keras-hub')}" if v("keras-hub") else (
            f"keras-nlp {v('keras-nlp')}" if v("keras-nlp") else "keras-hub not installed")
        pkg = BACKENDS[self.backend]
        return f"{hub} / keras {v('keras') or 'not installed'} / {pkg} {v(pkg) or 'not installed'}"

    def _import(self):
        """keras on this adapter's backend, and keras_hub (or keras_nlp)."""
        if "keras" in sys.modules:
            keras = sys.modules["keras"]
            current = keras.config.backend()
            if current != self.backend:
                raise ParityInputError(
                    f"{self.name}: keras is already imported in this process with the {current!r} backend and "
                    f"cannot switch to {self.backend!r}; run {self.name} in a separate process "
                    f"(a separate report run, e.g. --impls {self.name})"
                )
        else:
            os.environ["KERAS_BACKEND"] = self.backend  # read once, when keras is first imported
            try:
                with _quiet_stderr():  # TensorFlow's and XLA's C++ start-up lines, written before any log level
                    import keras
            except ImportError as e:
                pkg = BACKENDS[self.backend]
                raise BackendMissing(
                    f"{self.name}: cannot import keras on the {self.backend!r} backend ({e}); "
                    f"pip install keras-hub {pkg}"
                ) from None
        try:
            with _quiet_stderr():
                import keras_hub as hub
        except ImportError:
            try:
                import keras_nlp as hub
            except ImportError:
                raise BackendMissing(f"{self.name}: keras-hub is not installed; pip install keras-hub") from None
        if self.backend == "torch":
            from parity.adapters.torch_setup import configure

            configure()  # same thread count as the other torch implementations
        return keras, hub

    def check(self, spec: GemmaSpec, dtype: str) -> None:
        if dtype not in DTYPES:
            raise ParityInputError(f"{self.name}: dtype {dtype!r} is not one of {DTYPES}")
        if dtype == "float64":
            raise Unsupported(
                f"{self.name}: cannot run float64: keras-hub's RMSNormalization and RoPE compute in float32 "
                "whatever the dtype (and JAX runs float64 as float32 unless x64 is enabled); "
                "use float32, bfloat16 or float16"
            )
        for field_, why in inexpressible(spec):
            raise Unsupported(
                f"{self.name}: spec {spec.name!r} has {field_}={getattr(spec, field_)!r}, but {why}; "
                f"drop {self.name} from --impls for this spec"
            )
        if self.needs_own_process():  # the harness runs it in a fresh process: only check it is installed
            import importlib.util

            if not (importlib.util.find_spec("keras_hub") or importlib.util.find_spec("keras_nlp")):
                raise BackendMissing(f"{self.name}: keras-hub is not installed; pip install keras-hub")
            return
        self._import()

    # -------------------------------------------------------------- build
    def build(self, spec: GemmaSpec, weights: Weights, dtype: str) -> KerasModel:
        self.check(spec, dtype)
        _, hub = self._import()
        kwargs = backbone_kwargs(spec)
        if spec.family == 3 and not hasattr(hub.models, "Gemma3Backbone"):
            raise Unsupported(f"{self.name}: this keras-hub has no Gemma3Backbone (family=3); "
                              "pip install -U keras-hub, or drop it from --impls")
        backbone_cls, lm_cls = ((hub.models.Gemma3Backbone, hub.models.Gemma3CausalLM) if spec.family == 3
                                else (hub.models.GemmaBackbone, hub.models.GemmaCausalLM))
        import keras
        import ml_dtypes

        # bfloat16 buffers for a bfloat16 model on JAX (which takes ml_dtypes arrays as they are)
        buf_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" and self.backend == "jax" else np.float32

        def load(path: str) -> np.ndarray:
            name = plan[path].name
            t = np.empty(weights.shape(name), buf_dtype)
            weights.read_into(name, t)
            return keras_layout(name, t, spec)

        # Built in a stateless scope, the variables are created without values; each is then initialised
        # from the weights when the scope ends, one at a time: no random init (3.5x the weights at its
        # peak in bfloat16) and never a second copy of the model. If this keras does not defer (private
        # API), the variables are assigned one by one after an ordinary build instead.
        with keras.StatelessScope():
            backbone = backbone_cls(**kwargs, dtype=dtype)
            variables = {v.path: v for v in backbone.weights}
            if len(variables) != len(backbone.weights):
                raise RuntimeError(f"{self.name}: two backbone variables share a path; cannot map weights by path")
            shapes = {p: tuple(v.shape) for p, v in variables.items()}
            planned = {name: _Planned(name, keras_layout(name, np.empty(weights.shape(name), np.uint8), spec).shape)
                       for name in weights.tensors}
            plan = map_weights(planned, name_map(spec), shapes, where=f"{self.name} weights")
            deferred = all(getattr(v, "_value", 0) is None and hasattr(v, "_initializer") for v in variables.values())
            if deferred:
                for path, v in variables.items():  # in the variable's dtype, as assign would cast it
                    v._initializer = lambda shape, dtype=None, _p=path: keras.ops.convert_to_tensor(load(_p), dtype)
        if not deferred:
            for path, v in variables.items():
                v.assign(load(path))  # cast to the variable dtype; canonical weights are bf16-exact
        lm = lm_cls(backbone=backbone, preprocessor=None)
        model = KerasModel(spec, dtype, self.backend, backbone, lm, requested=kwargs)
        model.differences = _differences(model)
        return model

    # ---------------------------------------------------------------- run
    def run(self, model: KerasModel, tokens: list[int], feed: dict[str, np.ndarray] | None = None) -> RunResult:
        spec = model.spec
        self._check_ids(spec, tokens, "tokens", empty_ok=False)
        tap_map = expand_tap_map(TAP_MAP, spec)
        feeds = _feeds(spec, feed, len(tokens))
        ids = np.asarray([tokens], dtype="int32")
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        clean = not feed  # an unfed run shows what the model does by itself: effective() reads the latest
        attention = model.backbone.transformer_layers[0].attention
        with _recording(model, tap_map, feeds) as (taps, observed), \
                _call_order(attention if clean else None, QK_ROPE_CALLS) as order:
            model.lm(inputs, training=False)  # keras-hub's own eager forward pass, logits included
        model.observed = observed
        if clean:
            model.clean = {**observed, "call_order": list(order)}
        return RunResult(dict(taps), _unavailable(model, tap_map, taps, observed))

    # ------------------------------------------------------------- decode
    decodes = True

    def decode(self, model: KerasModel, prompt: list[int], continuation: list[int]) -> DecodeResult:
        """keras-hub's incremental path: the cache seeded by `_build_cache` as `generate()` seeds it, then one
        eager `call_with_cache(token, cache, cache_update_index=p)` per continuation token.

        The cache is keras-hub's own dense buffer of len(prompt) + len(continuation) slots, slot j holding
        position j (GemmaCausalLM: one [batch, layers, 2, slots, kv, head_dim] tensor; Gemma3CausalLM: a
        tuple of per-layer (key, value) [batch, slots, kv, head_dim]). Every layer, local or global, keeps
        every position; the window is only a mask. The softmax runs over all slots, so `attn.probs` is
        [heads, 1, slots] with key positions 0..slots-1 (slots past p, which hold the prefill's pad keys,
        and out-of-window slots get probability 0). The cache views hold positions 0..p.
        """
        from keras import ops

        spec, lm = model.spec, model.lm
        self._check_ids(spec, prompt, "prompt", empty_ok=False)
        self._check_ids(spec, continuation, "continuation", empty_ok=True)
        P, slots = len(prompt), len(prompt) + len(continuation)
        tap_map = expand_tap_map(TAP_MAP, spec)
        # generate()'s buffer: the prompt, then the preprocessor's pad id (0) where tokens are to come;
        # the pads' keys are written by the prefill and overwritten one by one as the decode reaches them
        ids = np.zeros((1, slots), "int32")
        ids[0, :P] = prompt
        padding = np.zeros((1, slots), bool)
        padding[0, :P] = True
        build_params = list(inspect.signature(lm._build_cache).parameters)[1:]
        step_params = inspect.signature(lm.call_with_cache).parameters
        attention = [b.attention for b in model.backbone.transformer_layers]
        # GemmaBackbone stores q and k permuted to interleaved order after RoPE; the view un-permutes the
        # keys to the half-split layout every other implementation (and the contract) uses
        permuted = [_permuted_after_rope(a) for a in attention]
        steps: list[DecodeStep] = []
        observed: dict = {"missing": {}}
        with _inference(self.backend):
            # Gemma3CausalLM's generate() passes its padding mask to the prefill (None for images);
            # GemmaCausalLM's takes the token ids alone
            extra = {n: (ops.convert_to_tensor(padding) if n == "padding_mask" else None) for n in build_params}
            _, cache = lm._build_cache(ops.convert_to_tensor(ids), **extra)
            for s, token in enumerate(continuation):
                p = P + s
                ids[0, p] = token  # where generate()'s sampler writes the token it chose
                kw = {}
                if "cache_update_mask" in step_params:  # generate(): ~padding_mask, True past the prompt
                    kw["cache_update_mask"] = ops.convert_to_tensor(~padding[:, p:p + 1])
                with _recording(model, tap_map, {}) as (taps, observed):  # the same wrappers as run()
                    # an int tensor index, as generate()'s loop passes it
                    _, _, cache = lm.call_with_cache(ops.convert_to_tensor(ids[:, p:p + 1]), cache,
                                                     ops.convert_to_tensor(p, "int32"), **kw)
                views = {}
                for i, (k, v) in enumerate(_layer_kv(cache, spec.num_layers, model.dtype)):
                    k, v = k[:p + 1].transpose(1, 0, 2), v[:p + 1].transpose(1, 0, 2)  # [kv, p + 1, hd]
                    if permuted[i]:
                        k = np.concatenate([k[..., 0::2], k[..., 1::2]], axis=-1)
                    views[i] = CacheView(np.arange(p + 1), np.ascontiguousarray(k), v.copy())
                probs = {i: np.arange(slots) for i in range(spec.num_layers) if f"layers.{i}.attn.probs" in taps}
                steps.append(DecodeStep(taps=dict(taps), cache=views, key_positions=probs))
        unavailable = _unavailable(model, tap_map, steps[-1].taps, observed) if steps else {}
        for i, known in enumerate(permuted):
            if known is None:
                for name in ("cache.k", "cache.v"):
                    unavailable[f"layers.{i}.{name}"] = (
                        "could not tell whether this keras-hub permutes the keys after RoPE (private _apply_rope)")
                for step in steps:
                    step.cache.pop(i, None)
        return DecodeResult(steps, unavailable)

    def _check_ids(self, spec: GemmaSpec, ids, what: str, empty_ok: bool) -> None:
        bad = [t for t in ids if not (isinstance(t, (int, np.integer)) and 0 <= t < spec.vocab_size)]
        if bad or (not ids and not empty_ok):
            raise ParityInputError(
                f"{self.name}: the {what} must be a {'' if empty_ok else 'non-empty '}list of ids in "
                f"[0, {spec.vocab_size}); got {bad[:3] or ids}"
            )

    # ---------------------------------------------------------- effective
    def effective(self, model: KerasModel) -> dict:
        import keras
        from keras import ops

        spec, bb = model.spec, model.backbone
        blocks = bb.transformer_layers
        att = [b.attention for b in blocks]
        cdt = bb.compute_dtype
        # what the GELU call is given and returns, which projection it gates, and in which order block 0's
        # attention calls its q norm and its RoPE: seen in the last unfed run, else in a short probe pass
        # (a new prompt length costs a fresh XLA compile, most of the harness's overhead on tiny shapes)
        if not model.clean:
            self.run(model, [spec.bos_token_id] + [i % spec.vocab_size for i in (3, 4, 5)])
        obs, order = model.clean, model.clean["call_order"]

        # the norm offset, observed: RMSNormalization of an all-ones row is (1 + w) or w
        n0 = blocks[0].pre_attention_norm
        w = np.asarray(ops.convert_to_numpy(n0.scale), dtype=np.float64)
        y = np.asarray(ops.convert_to_numpy(n0(ops.ones((1, 1, w.shape[0]), dtype=cdt))), np.float64)[0, 0]
        offset = "(1 + w)" if np.allclose(y, 1 + w, rtol=2e-2, atol=1e-3) else (
            "w" if np.allclose(y, w, rtol=2e-2, atol=1e-3) else "neither (1 + w) nor w")
        eps = sorted({n.epsilon for b in blocks for n in _block_norms(b)})
        qk = [n for a in att for n in (getattr(a, "query_norm", None), getattr(a, "key_norm", None)) if n is not None]

        def one_or_all(values: list):
            return values[0] if len({repr(v) for v in values}) == 1 else values

        fused = _fused(model)
        norm_scale = float(ops.convert_to_numpy(ops.cast(ops.sqrt(bb.hidden_dim), cdt)))
        qscales = [1 / math.sqrt(_builtquery_scalar(a)) for a in att]
        placement = ["sandwich" if b.use_post_attention_norm and b.use_post_ffw_norm else
                     "pre" if not (b.use_post_attention_norm or b.use_post_ffw_norm) else
                     f"post-attention norm {b.use_post_attention_norm}, post-FFW norm {b.use_post_ffw_norm}"
                     for b in blocks]
        qk_used = [bool(getattr(a, "use_query_key_norm", False)) for a in att]
        if not any(qk_used):
            qk_norm = False
        else:
            where = ("before RoPE" if order[:2] in (["query_norm", "rope_layer"], ["key_norm", "rope_layer"])
                     else f"call order {order[:4]}")
            qk_norm = (f"RMSNorm over head_dim on q and k, {where} (block 0), eps {sorted({n.epsilon for n in qk})}"
                       + ("" if all(qk_used) else f"; layers {[i for i, u in enumerate(qk_used) if u]} only"))
        block = type(blocks[0]).__name__
        return {
            "backend": f"{keras.config.backend()}, compute dtype {cdt}",
            "class": f"{type(bb).__name__} / {type(model.lm).__name__}",
            "activation": obs.get("gelu_kind", "?") + f" ({obs.get('gelu_args', '?')} in {block}.call; "
            f"{obs.get('gelu_evidence', 'no evidence')}; keras.ops.gelu on {keras.config.backend()} in {cdt})",
            "geglu": obs.get("geglu", "?"),
            "norm": f"{offset} in float32 (keras-hub casts to float32), cast once after the multiply, "
            f"eps {eps} in blocks, {bb.layer_norm.epsilon} final",
            "norm_placement": one_or_all(placement),
            "qk_norm": qk_norm,
            "embed_scale": f"sqrt({bb.hidden_dim}) cast to the activation dtype: {norm_scale:.6g} in {cdt}",
            "query_scale": one_or_all(qscales),
            "rope_base": [float(a.rope_layer.max_wavelength) for a in att],
            "rope_scaling": [f"{a.rope_layer.rope_type} {float(a.rope_layer.scaling_factor):g}" for a in att],
            "rope": f"{_rope_layout(att[0])}; angles float32, cos/sin in {att[0].rope_layer.compute_dtype}",
            "attention": ("fused ops.dot_product_attention" if fused else
                          f"q * scale in {cdt} before q.k, einsum scores, softcap in {cdt}, softmax in float32")
            + ("" if fused is not None else " (fused path not determined)"),
            "attn_softcap": one_or_all([a.logit_soft_cap for a in att]),
            "final_softcap": bb.token_embedding.logit_soft_cap,
            "window": [_observed_window(a) for a in att],  # from keras-hub's own sliding mask
            "final_norm": True,
            "tied_head": bool(bb.token_embedding.tie_weights),
            "differs_from_spec": model.differences,
        }

    def release(self, model: KerasModel) -> None:
        model.backbone = model.lm = None
        model.observed, model.clean = {}, {}
        if "keras" in sys.modules:
            sys.modules["keras"].backend.clear_session()  # also frees keras' global name/graph state


# ------------------------------------------------------------------ helpers
QK_ROPE_CALLS = ("query_norm", "key_norm", "rope_layer")


@contextmanager
def _call_order(layer, names: tuple[str, ...]):
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


def _rope_probe(a):
    """(x, the RotaryEmbedding of x, the attention's _apply_rope of x or None) for a random x [1, 3, 1, hd]."""
    from keras import ops

    hd = int(a.head_dim)
    x = np.random.default_rng(0).standard_normal((1, 3, 1, hd)).astype(np.float32)
    xt = ops.convert_to_tensor(x, dtype=a.rope_layer.compute_dtype)
    rotated = np.asarray(ops.convert_to_numpy(a.rope_layer(xt, start_index=0)), np.float32)
    try:
        applied = np.asarray(ops.convert_to_numpy(a._apply_rope(xt, 0)), np.float32)
    except Exception:  # a private helper
        applied = None
    return x, rotated, applied


def _interleaved(x: np.ndarray) -> np.ndarray:
    """[a0, b0, a1, b1, ...] from the halves a, b of the last axis (GemmaBackbone's post-RoPE layout)."""
    return np.stack(np.split(x, 2, axis=-1), axis=-1).reshape(x.shape)


def _permuted_after_rope(a) -> bool | None:
    """Whether the attention layer permutes rotated q/k into interleaved order; None: cannot tell."""
    _, rotated, applied = _rope_probe(a)
    if applied is None:
        return None
    if np.array_equal(applied, rotated):
        return False
    return True if np.array_equal(applied, _interleaved(rotated)) else None


def _rope_layout(a) -> str:
    """Half-split or interleaved, and whether q/k are permuted after the rotation, read off the layer."""
    x, rotated, applied = _rope_probe(a)
    hd = int(a.head_dim)
    if applied is None:
        return "half-split (RotaryEmbedding); post-rotation layout not determined"
    # half-split rotation at position 1: x1' = x1 cos - x2 sin (first half from both halves)
    half = hd // 2
    inv = 1.0 / float(a.rope_layer.max_wavelength) ** (np.arange(half) * 2 / hd)
    if a.rope_layer.rope_type == "linear":
        inv = inv / float(a.rope_layer.scaling_factor)
    c, s_ = np.cos(inv), np.sin(inv)
    x1, x2 = x[0, 1, 0, :half], x[0, 1, 0, half:]
    want = np.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_])
    split = "half-split" if np.allclose(rotated[0, 1, 0], want, atol=2e-2) else "not half-split"
    if np.array_equal(applied, rotated):
        return f"{split} (RotaryEmbedding), q/k not permuted"
    if np.array_equal(applied, _interleaved(rotated)):
        return f"{split} (RotaryEmbedding), then q/k permuted to interleaved order (scores unchanged)"
    return f"{split} (RotaryEmbedding), then q/k changed in an unrecognised way"


def _unavailable(model: KerasModel, tap_map: dict, taps: dict, observed: dict) -> dict[str, str]:
    """tap -> why it was not recorded, for the taps of `tap_map` a forward pass (or decode step) lacked."""
    unavailable = {
        f"layers.{i}.attn.scores": (
            "keras-hub's Softmax layer takes the unmasked logits and a boolean mask and adds its large negative "
            "inside the layer: the masked scores never exist as a value")
        for i in range(model.spec.num_layers)
    }
    for t in tap_map:
        if t in taps:
            continue
        if t.endswith(".attn.probs") and _fused(model):
            why = "keras-hub ran its fused attention op (ops.dot_product_attention): no probabilities exist"
        else:
            why = "not produced during the forward pass; the installed keras-hub's call structure differs"
        unavailable[t] = observed["missing"].get(t, why)
    return unavailable


def _layer_kv(cache, num_layers: int, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each layer's (keys, values) [slots, kv, head_dim] from keras-hub's cache, batch dropped.

    GemmaCausalLM stacks every layer into one [batch, layers, 2, slots, kv, hd] tensor; Gemma3CausalLM
    keeps a tuple of per-layer (key, value) tensors [batch, slots, kv, hd].
    """
    from keras import ops

    out = np.float64 if dtype == "float64" else np.float32  # bf16/fp16 -> fp32 is exact

    def arr(t) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(t)).astype(out)[0]

    if isinstance(cache, (tuple, list)):
        if len(cache) != num_layers:
            raise RuntimeError(f"keras-hub's cache has {len(cache)} entries for {num_layers} layers")
        return [(arr(k), arr(v)) for k, v in cache]
    whole = arr(cache)  # [layers, 2, slots, kv, hd]
    if whole.ndim != 5 or whole.shape[:2] != (num_layers, 2):
        raise RuntimeError(f"keras-hub's cache has shape {whole.shape}, not [layers, 2, slots, kv, head_dim]")
    return [(whole[i, 0], whole[i, 1]) for i in range(num_layers)]


@contextmanager
def _inference(backend: str):
    """No autograd graph on torch: the cache of each step would otherwise hold every earlier step's graph."""
    if backend != "torch":
        yield
        return
    import torch

    with torch.no_grad():
        yield


def _fused(model: KerasModel) -> bool | None:
    """Whether keras-hub's attention takes its fused path here (GPU/TPU with a fused op); None: unknown."""
    try:
        return bool(model.backbone.transformer_layers[0].attention._use_fused_attention_op())
    except Exception:  # a private helper; other versions may lack it
        return None


def _block_norms(b) -> list:
    """A decoder block's RMSNormalization layers: the pre norms and whichever post norms it has."""
    names = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
    return [n for n in (getattr(b, name, None) for name in names) if n is not None]


def _builtquery_scalar(a) -> int:
    """What the attention layer divides by (its own flag, not the block's or the backbone's)."""
    return a.head_dim if a.query_head_dim_normalize else a.hidden_dim // a.num_query_heads


def _differences(model: KerasModel) -> dict:
    """Read the built layers back: spec field -> {spec, built, why} wherever they differ.

    Not refused: keras-hub accepted the spec's numbers and built something
    else, and the report shows what that does. Known cases carry the reason.
    """
    s, bb = model.spec, model.backbone
    blocks = bb.transformer_layers
    per_layer: dict[str, tuple[list, list]] = {}

    def add(f: str, want, got) -> None:
        per_layer.setdefault(f, ([], []))
        per_layer[f][0].append(want)
        per_layer[f][1].append(got)

    for i, b in enumerate(blocks):
        a = b.attention
        add("query_pre_attn_scalar", query_scalar(s), _builtquery_scalar(a))
        add("rope_base", s.rope_base_for(i), float(a.rope_layer.max_wavelength))
        add("rope_scaling_factor", s.rope_factor_for(i),
            float(a.rope_layer.scaling_factor) if a.rope_layer.rope_type == "linear" else a.rope_layer.rope_type)
        add("attn_softcap", s.attn_softcap, a.logit_soft_cap)
        add("sliding_window", s.window_for(i), _observed_window(a))
        add("qk_norm", s.qk_norm, bool(getattr(a, "use_query_key_norm", False)))
        add("norm_placement", s.norm_placement,
            "sandwich" if b.use_post_attention_norm and b.use_post_ffw_norm else
            "pre" if not (b.use_post_attention_norm or b.use_post_ffw_norm) else "mixed")
        eps = {n.epsilon for n in _block_norms(b)}
        eps |= {n.epsilon for n in (getattr(a, "query_norm", None), getattr(a, "key_norm", None)) if n is not None}
        add("norm_eps", s.norm_eps, sorted(eps)[0] if len(eps) == 1 else sorted(eps))
    out = {}
    for f, (want, got) in per_layer.items():
        if want != got:
            same = len(set(map(repr, want))) == 1 and len(set(map(repr, got))) == 1
            out[f] = {"spec": want[0] if same else want, "built": got[0] if same else got}
    for f, want, got in (("norm_eps", s.norm_eps, bb.layer_norm.epsilon),
                         ("final_softcap", s.final_softcap, bb.token_embedding.logit_soft_cap),
                         ("tied_head", s.tied_head, bool(bb.token_embedding.tie_weights))):
        if want != got and f not in out:
            out[f] = {"spec": want, "built": got}
    if "query_pre_attn_scalar" in out and any(
            not b.query_head_dim_normalize and b.attention.query_head_dim_normalize for b in blocks):
        out["query_pre_attn_scalar"]["why"] = (
            f"{type(blocks[0]).__name__} was given query_head_dim_normalize=False but builds its attention with "
            "query_head_dim_normalize=True: q is scaled by 1/sqrt(head_dim)")
    return out


def _observed_window(a) -> int | None:
    """The window keras-hub's own sliding mask gives: 1 + the largest i - j it keeps (None: not local)."""
    if not a.use_sliding_window_attention:
        return None
    from keras import ops

    w = int(a.sliding_window_size)
    T = w + 2  # long enough to see both an allowed and a cut key
    try:
        m = np.asarray(ops.convert_to_numpy(a._mask_sliding_window(ops.ones((1, T, T), "bool"))))[0]
    except Exception:  # a private helper; other versions may differ: fall back to the declared size
        return w
    i, j = np.nonzero(np.tril(m))
    d = i - j
    kept = set(d.tolist())
    widest = int(d.max())
    if kept != set(range(widest + 1)):  # not a band: say so rather than guess a number
        return -1
    return widest + 1


def _feeds(spec: GemmaSpec, feed: dict[str, np.ndarray] | None, n_tokens: int) -> dict[str, np.ndarray]:
    """Isolated mode: tap -> reference input becomes keras layer path -> array [T, width]."""
    if not feed:
        return {}
    entries = []
    for tap, value in feed.items():
        i = layer_of(tap)
        key = tap if i is None else tap.replace(f"layers.{i}.", "layers.{}.", 1)
        if key not in FEED_MAP or tap not in tap_names(spec):
            raise ParityInputError(
                f"keras: cannot feed tap {tap!r}: it is not the output of a keras-hub sub-layer; "
                f"feedable taps look like {', '.join(sorted(FEED_MAP))}"
            )
        width = spec.intermediate_size if key in ("layers.{}.mlp.act",) else spec.hidden_size
        value = np.asarray(value)
        if value.shape != (n_tokens, width):
            raise ParityInputError(
                f"keras: feed for {tap!r} has shape {value.shape}, the input it replaces is {(n_tokens, width)}"
            )
        entries.append((FEED_MAP[key], i, value))
    out = {}
    for paths, i, value in sorted(entries, key=lambda e: -len(e[0])):  # one-path entries applied last: they win
        for p in paths:
            out[p if i is None else p.format(i)] = value
    return out


def _to_numpy(x) -> np.ndarray:
    from keras import ops

    a = np.asarray(ops.convert_to_numpy(x))
    if a.dtype != np.float64:
        a = a.astype(np.float32)  # bf16/fp16 -> fp32 is exact
    return a[0].copy()  # drop the batch dimension


def _sub_layer(root, path: str):
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


def _fed(value: np.ndarray, like):
    """The fed array as a tensor of the replaced input's dtype, batch dimension added."""
    from keras import backend, ops

    t = ops.convert_to_tensor(np.asarray(value)[None], dtype=backend.standardize_dtype(like.dtype))
    if tuple(t.shape) != tuple(like.shape):
        raise ParityInputError(f"keras: fed array of shape {tuple(t.shape)} replaces an input of {tuple(like.shape)}")
    return t


def _gelu_observation(x, y, args, kwargs, original, obs: dict) -> None:
    """Which GELU block 0 evaluated: its resolved arguments, and its numbers against both formulas."""
    approximate = None
    try:
        bound = inspect.signature(original).bind(x, *args, **kwargs)
        bound.apply_defaults()
        approximate = bound.arguments.get("approximate")
        obs["gelu_args"] = f"gelu(approximate={approximate!r})"
    except (TypeError, ValueError):
        obs["gelu_args"] = f"gelu(args={args!r}, kwargs={kwargs!r})"
    xi = np.asarray(_to_numpy(x), np.float64).ravel()[:4096]
    yo = np.asarray(_to_numpy(y), np.float64).ravel()[:4096]
    tanh = 0.5 * xi * (1 + np.tanh(math.sqrt(2 / math.pi) * (xi + 0.044715 * xi**3)))
    exact = 0.5 * xi * (1 + np.vectorize(math.erf)(xi / math.sqrt(2)))
    et, ee = float(np.abs(yo - tanh).max()), float(np.abs(yo - exact).max())
    obs["gelu_evidence"] = f"output vs tanh-GELU max err {et:.2g}, vs exact {ee:.2g}"
    rt, re_ = float(np.mean((yo - tanh) ** 2)), float(np.mean((yo - exact) ** 2))
    if rt < re_ / 4 or re_ < rt / 4:  # the numbers decide
        obs["gelu_kind"] = "tanh" if rt < re_ else "exact"
    else:  # 16-bit rounding hides the difference: say what the argument asks for
        by_arg = {True: "tanh", False: "exact"}.get(approximate, "?")
        obs["gelu_kind"] = f"{by_arg} by its argument (the two formulas are indistinguishable at this precision)"
    obs["gelu_in"] = _to_numpy(x)


@contextmanager
def _recording(model: KerasModel, tap_map: dict[str, tuple[str, str]], feeds: dict[str, np.ndarray]):
    """Yield (taps, observed) that fill while keras-hub runs; every wrapper is removed on exit.

    Each wrapper records its layer's first input and/or output and calls the
    original `call` with the same arguments (a fed array, in isolated mode,
    replaces the first input); the result is returned untouched.
    """
    bb = model.backbone
    taps: dict[str, np.ndarray] = {}
    observed: dict = {"missing": {}}
    current: list[int] = []  # index of the decoder block now running (for the inline GELU)
    gelu_calls: dict[int, int] = {}
    by_path: dict[str, list[tuple[str, str]]] = {}
    for tap, (path, side) in tap_map.items():
        by_path.setdefault(path, []).append((tap, side))
    blocks = [f"decoder_block_{i}" for i in range(model.spec.num_layers)]
    gelu_paths = {p for p in set(by_path) | set(feeds) if p.endswith("/" + GELU)}
    layer_paths = (set(by_path) | set(feeds) | set(blocks)) - gelu_paths

    def wrap(layer, path: str):
        original = layer.call  # bound: whatever the class (or a test's monkeypatch) defines now
        entries = by_path.get(path, [])
        value = feeds.get(path)
        reverse_only = path.endswith(REVERSE)
        block = blocks.index(path) if path in blocks else None

        def call(*args, **kwargs):
            if reverse_only and not kwargs.get("reverse", False):
                return original(*args, **kwargs)  # the embedding lookup, not the output head
            if value is not None:
                args = (_fed(value, args[0]), *args[1:])
            for tap, side in entries:
                if side == "in":
                    taps[tap] = _to_numpy(args[0])
            if block is not None:
                current.append(block)
            try:
                y = original(*args, **kwargs)
            finally:
                if block is not None:
                    current.pop()
            for tap, side in entries:
                if side == "out":
                    a = _to_numpy(y[0] if isinstance(y, (tuple, list)) else y)
                    if tap.endswith(".attn.probs"):
                        a = a.reshape(-1, *a.shape[-2:])  # [kv, group, T, S] -> [heads, T, S]
                    taps[tap] = a
            return y

        return call

    def wrap_cos(layer, path: str):
        original = layer._compute_cos_sin_embedding
        entries = by_path.get(path, [])

        def compute(*args, **kwargs):
            out = original(*args, **kwargs)
            for tap, _side in entries:
                if tap not in taps:  # q's table; k's is the same call again
                    cos = _to_numpy(out[0])
                    taps[tap] = cos.reshape(cos.shape[0], cos.shape[-1])
            return out

        return compute

    installed = []  # (layer, attribute, previous instance-level value or None)
    acts = gelu_original = None
    try:
        for path in sorted(layer_paths):
            try:
                layer = _sub_layer(bb, path.removesuffix(REVERSE).removesuffix(COS))
                attr = "_compute_cos_sin_embedding" if path.endswith(COS) else "call"
                getattr(layer, attr)
            except (KeyError, ValueError, AttributeError) as e:  # keras-hub renamed or restructured a layer
                if path in feeds:
                    raise ParityInputError(f"keras: cannot feed {path}: {e}") from None
                for tap, _side in by_path.get(path, []):
                    observed["missing"][tap] = f"no keras-hub layer {path} in this version ({e})"
                continue
            installed.append((layer, attr, layer.__dict__.get(attr)))
            new = wrap_cos(layer, path) if attr != "call" else wrap(layer, path)
            object.__setattr__(layer, attr, new)  # bypass keras attribute tracking

        # The GeGLU's GELU is a function call inside the decoder block's call:
        # wrap the `gelu` that the block's module finds in keras.activations.
        block_module = sys.modules[type(bb.transformer_layers[0]).__module__]
        acts = getattr(getattr(block_module, "keras", None), "activations", None)
        if acts is None or not callable(getattr(acts, "gelu", None)):
            acts = None
            for i in range(model.spec.num_layers):
                observed["missing"][f"layers.{i}.mlp.act"] = (
                    f"{block_module.__name__} does not call keras.activations.gelu in this keras-hub version")
        else:
            gelu_original = acts.gelu

            def gelu(x, *args, **kwargs):
                i = current[-1] if current else None
                value = feeds.get(f"decoder_block_{i}/{GELU}") if i is not None else None
                if value is not None:
                    x = _fed(value, x)
                y = gelu_original(x, *args, **kwargs)
                if i is not None:
                    gelu_calls[i] = gelu_calls.get(i, 0) + 1
                    tap = f"layers.{i}.mlp.act"
                    if tap in tap_map:
                        taps[tap] = _to_numpy(y)
                    if i == 0 and gelu_calls[i] == 1:
                        _gelu_observation(x, y, args, kwargs, gelu_original, observed)
                return y

            acts.gelu = gelu
        yield taps, observed
    finally:
        if acts is not None:
            acts.gelu = gelu_original
        for layer, attr, previous in reversed(installed):
            if previous is None:
                object.__delattr__(layer, attr)
            else:
                object.__setattr__(layer, attr, previous)

    for i in range(model.spec.num_layers):
        tap = f"layers.{i}.mlp.act"
        if acts is not None and gelu_calls.get(i, 0) != 1:
            taps.pop(tap, None)
            observed["missing"][tap] = (
                f"keras.activations.gelu was called {gelu_calls.get(i, 0)} times in decoder block {i}, "
                "not once; cannot tell which call is the GeGLU's")
    if "gelu_in" in observed:  # which projection the GELU was applied to (block 0, from recorded numbers)
        gin = observed.pop("gelu_in")
        gate, up = taps.get("layers.0.mlp.gate"), taps.get("layers.0.mlp.up")
        observed["geglu"] = (
            "gelu(gate) * up" if gate is not None and np.array_equal(gin, gate)
            else "gelu(up) * gate" if up is not None and np.array_equal(gin, up)
            else "gelu input is neither projection's output")


class _quiet_stderr:
    """Point file descriptor 2 at /dev/null while a library starts up, then restore it.

    TensorFlow, absl and XLA print "could not find cuda drivers" and "All log
    messages before absl::InitializeLog()" from C++ at import time, before
    TF_CPP_MIN_LOG_LEVEL or any Python logger can stop them; only the
    descriptor can. An ImportError still reaches the caller (Python raises it
    after the block), and the saved descriptor is always put back.
    """

    def __enter__(self):
        import sys

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False
