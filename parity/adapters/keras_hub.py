"""Adapter for keras-hub's Gemma 1 (`keras_hub.models.GemmaBackbone` + `GemmaCausalLM`).

keras and keras-hub are imported inside the methods, after KERAS_BACKEND is
set: one process runs one keras backend, so `keras-jax` and `keras-torch`
need separate processes (separate report runs).

Taps are recorded while keras-hub runs its own eager forward pass: each
sub-layer instance used gets its `call` wrapped for the duration of `run()`
(record the input/output, call the original unchanged), and the GeGLU's
GELU, which `GemmaDecoderBlock.call` evaluates inline as
`keras.activations.gelu(x1, approximate=True)`, is recorded by wrapping the
`gelu` attribute of the `keras.activations` module that the block's module
looks up at call time. Nothing here re-computes the glue between sub-layers.

What the installed keras-hub (0.32) does, read from its source
(keras_hub/src/models/gemma/) and checked again on the built layers in
`_verify`:

- `intermediate_dim` is the width of BOTH GeGLU halves together: each of
  `ffw_gating` (gate) and `ffw_gating_2` (up) has `intermediate_dim // 2`
  outputs, so it is 2 x HF `intermediate_size` (its HF converter does the same).
- Embeddings are scaled by `x * ops.cast(ops.sqrt(hidden_dim), x.dtype)`:
  the normaliser is rounded to the activation dtype (9.8125 for sqrt(96) in bf16).
- RMSNormalization computes in float32 whatever the dtype (so a float64 model
  would be downcast there), multiplies by `(1 + scale)` in float32 and casts
  the product to the compute dtype once.
- `GemmaDecoderBlock` gives its two norms the default epsilon 1e-6: the
  backbone's `layer_norm_epsilon` reaches only the final norm.
- `GemmaDecoderBlock` builds its attention with `query_head_dim_normalize=True`
  whatever it was given: q is multiplied by 1/sqrt(head_dim), in the compute
  dtype, before q.k.
- RoPE: `CachedGemmaAttention` hard-codes `RotaryEmbedding(max_wavelength=10_000)`
  (no scaling). Positions and inverse frequencies are float32, cos/sin are cast
  to the compute dtype. The rotation is half-split (as HF/reference), after
  which q and k are permuted into interleaved order
  ([a0, b0, a1, b1, ...] from halves a, b). Scores are unchanged, so only
  post-RoPE q/k taps (not produced here) would need un-permuting.
- Softmax runs in a float32 `keras.layers.Softmax` (recorded as the
  `attn.probs` tap, before keras-hub casts it to the compute dtype); on
  GPU/TPU keras-hub may take a fused `ops.dot_product_attention` path instead,
  and then no probabilities exist. The logits are
  `token_embedding(x, reverse=True)` (tied), as `GemmaCausalLM` builds them.
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

from parity.adapters.base import DTYPES, Adapter, RunResult
from parity.errors import BackendMissing, ParityInputError, Unsupported
from parity.spec import GemmaSpec
from parity.taps import expand_tap_map, layer_of, tap_names
from parity.weights import Weights, map_weights

BACKENDS = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}  # keras backend -> pip package
DEFAULT_BACKEND = "jax"

# canonical (HF) name -> keras variable path; `{}` is the layer index
NAME_MAP = {
    "model.embed_tokens.weight": "token_embedding/embeddings",  # also the (tied) output head
    "model.layers.{}.input_layernorm.weight": "decoder_block_{}/pre_attention_norm/scale",
    "model.layers.{}.self_attn.q_proj.weight": "decoder_block_{}/attention/query/kernel",
    "model.layers.{}.self_attn.k_proj.weight": "decoder_block_{}/attention/key/kernel",
    "model.layers.{}.self_attn.v_proj.weight": "decoder_block_{}/attention/value/kernel",
    "model.layers.{}.self_attn.o_proj.weight": "decoder_block_{}/attention/attention_output/kernel",
    "model.layers.{}.post_attention_layernorm.weight": "decoder_block_{}/pre_ffw_norm/scale",  # Gemma 1: pre-MLP
    "model.layers.{}.mlp.gate_proj.weight": "decoder_block_{}/ffw_gating/kernel",  # gelu() is applied to this one
    "model.layers.{}.mlp.up_proj.weight": "decoder_block_{}/ffw_gating_2/kernel",
    "model.layers.{}.mlp.down_proj.weight": "decoder_block_{}/ffw_linear/kernel",
    "model.norm.weight": "final_normalization/scale",
}

# Pseudo-paths that are not keras layers:
GELU = "gelu"  # decoder_block_{}/gelu: the inline keras.activations.gelu call in GemmaDecoderBlock.call
REVERSE = ":reverse"  # token_embedding:reverse: the tied output projection, token_embedding(x, reverse=True)

# canonical tap -> (keras layer path, "in" | "out"); `{}` is the layer index
TAP_MAP = {
    "embed": ("decoder_block_0", "in"),  # x * cast(sqrt(hidden), x.dtype), done in the backbone's graph
    "layers.{}.attn_norm": ("decoder_block_{}/pre_attention_norm", "out"),
    # attention internals: the float32 Softmax layer's output, before keras-hub casts it to the compute
    # dtype; `.softmax` is an attribute (the layer's auto-generated name varies). [kv, group, T, S] is
    # recorded as [heads, T, S] (head = kv * group_size + group, as HF/litgpt repeat kv heads)
    "layers.{}.attn.probs": ("decoder_block_{}/attention/.softmax", "out"),
    "layers.{}.attn": ("decoder_block_{}/attention", "out"),
    "layers.{}.attn_residual": ("decoder_block_{}/pre_ffw_norm", "in"),
    "layers.{}.mlp_norm": ("decoder_block_{}/pre_ffw_norm", "out"),
    "layers.{}.mlp.gate": ("decoder_block_{}/ffw_gating", "out"),
    "layers.{}.mlp.up": ("decoder_block_{}/ffw_gating_2", "out"),
    "layers.{}.mlp.act": ("decoder_block_{}/" + GELU, "out"),
    "layers.{}.mlp.hidden": ("decoder_block_{}/ffw_linear", "in"),
    "layers.{}.mlp": ("decoder_block_{}/ffw_linear", "out"),
    "layers.{}.out": ("decoder_block_{}", "out"),
    "final_norm": ("final_normalization", "out"),
    "logits": ("token_embedding" + REVERSE, "out"),
}

# Isolated mode: tap -> the layer(s) whose first input the fed array replaces.
# The MLP is inline in GemmaDecoderBlock.call, so "the MLP's input" enters
# through both input projections. A one-path entry (mlp.gate) wins over a
# several-path one (mlp) for the same layer. Taps produced by glue (embed,
# attn_residual, mlp.hidden) cannot be fed.
FEED_MAP = {
    "layers.{}.attn_norm": ("decoder_block_{}/pre_attention_norm",),
    "layers.{}.attn": ("decoder_block_{}/attention",),
    "layers.{}.mlp_norm": ("decoder_block_{}/pre_ffw_norm",),
    "layers.{}.mlp": ("decoder_block_{}/ffw_gating", "decoder_block_{}/ffw_gating_2"),
    "layers.{}.mlp.gate": ("decoder_block_{}/ffw_gating",),
    "layers.{}.mlp.up": ("decoder_block_{}/ffw_gating_2",),
    "layers.{}.mlp.act": ("decoder_block_{}/" + GELU,),
    "layers.{}.out": ("decoder_block_{}",),
    "final_norm": ("final_normalization",),
    "logits": ("token_embedding" + REVERSE,),
}


def to_keras_layout(tensors: dict[str, np.ndarray], spec: GemmaSpec) -> dict[str, np.ndarray]:
    """Reshape/transpose canonical (HF, torch Linear [out, in]) tensors into keras-hub's layouts.

    Names are kept, so `map_weights` can then check names and shapes. The
    same conversion as keras-hub's own convert_gemma.py; no head permutation
    is needed because keras-hub rotates half-split like HF and permutes q, k
    only after RoPE.
    """
    h, nq, nkv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    out = {}
    for name, t in tensors.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            n = nq if name.endswith("q_proj.weight") else nkv
            t = t.reshape(n, hd, h).transpose(0, 2, 1)  # [n*hd, h] -> [n, hd, h] -> EinsumDense "ndh": [n, h, hd]
        elif name.endswith("o_proj.weight"):
            t = t.T.reshape(nq, hd, h)  # [h, nq*hd] -> [nq*hd, h] -> "nhd": [nq, hd, h]
        elif name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
            t = t.T  # [out, in] -> "df"/"fd": [in, out]
        out[name] = np.ascontiguousarray(t)  # embeddings [vocab, h] and norm scales [h] are as HF stores them
    return out


@dataclass
class KerasModel:
    """What `build` returns: the keras objects and what `run`/`effective` need."""

    spec: GemmaSpec
    dtype: str
    backend: str
    backbone: Any
    lm: Any  # GemmaCausalLM(backbone, preprocessor=None): its output is the logits
    observed: dict = field(default_factory=dict)  # what the last run saw of the GELU call (for effective)


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
                import keras
            except ImportError as e:
                pkg = BACKENDS[self.backend]
                raise BackendMissing(
                    f"{self.name}: cannot import keras on the {self.backend!r} backend ({e}); "
                    f"pip install keras-hub {pkg}"
                ) from None
        try:
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

        def refuse(field_: str, why: str) -> None:
            raise Unsupported(
                f"{self.name}: spec {spec.name!r} has {field_}={getattr(spec, field_)!r}, but {why}; "
                f"drop {self.name} from --impls for this spec"
            )

        if spec.family != 1:
            refuse("family", "this adapter builds keras-hub's Gemma 1 (GemmaBackbone) only")
        if spec.norm_placement != "pre":
            refuse("norm_placement", "Gemma 1 in keras-hub is pre-norm only")
        if not spec.norm_unit_offset:
            refuse("norm_unit_offset", "keras-hub's Gemma RMSNormalization always multiplies by (1 + scale)")
        if spec.norm_eps != 1e-6:
            refuse("norm_eps", "GemmaBackbone passes layer_norm_epsilon only to the final norm; "
                   "the decoder-block norms always use 1e-6")
        if spec.gelu_approximate != "tanh":
            refuse("gelu_approximate", "GemmaDecoderBlock hard-codes gelu(approximate=True) (tanh)")
        if not spec.embed_scale:
            refuse("embed_scale", "GemmaBackbone always multiplies the embeddings by sqrt(hidden_dim)")
        if spec.embed_scale_dtype != "activation":
            refuse("embed_scale_dtype", "GemmaBackbone casts sqrt(hidden_dim) to the activation dtype")
        if not spec.tied_head:
            refuse("tied_head", "GemmaBackbone's ReversibleEmbedding always ties the output head")
        if spec.rope_base != 10_000.0:
            refuse("rope_base", "CachedGemmaAttention hard-codes RotaryEmbedding(max_wavelength=10_000)")
        if spec.rope_scaling_factor != 1.0:
            refuse("rope_scaling_factor", "CachedGemmaAttention applies no RoPE scaling")
        if not math.isclose(spec.query_scale, 1 / math.sqrt(spec.head_dim), rel_tol=1e-12):
            refuse("query_pre_attn_scalar", "GemmaDecoderBlock always scales q by 1/sqrt(head_dim)")
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
        backbone = hub.models.GemmaBackbone(
            vocabulary_size=spec.vocab_size,
            num_layers=spec.num_layers,
            num_query_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            hidden_dim=spec.hidden_size,
            intermediate_dim=2 * spec.intermediate_size,  # keras-hub: both GeGLU halves together
            head_dim=spec.head_dim,
            layer_norm_epsilon=spec.norm_eps,
            dropout=0,
            dtype=dtype,
        )
        variables = {v.path: v for v in backbone.weights}
        if len(variables) != len(backbone.weights):
            raise RuntimeError(f"{self.name}: two backbone variables share a path; cannot map weights by path")
        shapes = {p: tuple(v.shape) for p, v in variables.items()}
        mapped = map_weights(to_keras_layout(weights.tensors, spec), NAME_MAP, shapes,
                             where=f"{self.name} weights")
        for path, v in variables.items():
            v.assign(mapped[path])  # cast to the variable dtype; canonical weights are bf16/fp16-exact
        lm = hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
        model = KerasModel(spec, dtype, self.backend, backbone, lm)
        _verify(model, self.name)
        return model

    # ---------------------------------------------------------------- run
    def run(self, model: KerasModel, tokens: list[int], feed: dict[str, np.ndarray] | None = None) -> RunResult:
        spec = model.spec
        bad = [t for t in tokens if not (isinstance(t, (int, np.integer)) and 0 <= t < spec.vocab_size)]
        if not tokens or bad:
            raise ParityInputError(
                f"{self.name}: tokens must be a non-empty list of ids in [0, {spec.vocab_size}); "
                f"got {bad[:3] or tokens}"
            )
        tap_map = expand_tap_map(TAP_MAP, spec)
        feeds = _feeds(spec, feed, len(tokens))
        ids = np.asarray([tokens], dtype="int32")
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        with _recording(model, tap_map, feeds) as (taps, observed):
            model.lm(inputs, training=False)  # keras-hub's own eager forward pass, logits included
        model.observed = observed
        unavailable = {}
        for t in tap_map:
            if t in taps:
                continue
            if t.endswith(".attn.probs") and _fused(model):
                why = "keras-hub ran its fused attention op (ops.dot_product_attention): no probabilities exist"
            else:
                why = "not produced during the forward pass; the installed keras-hub's call structure differs"
            unavailable[t] = observed["missing"].get(t, why)
        return RunResult(dict(taps), unavailable)

    # ---------------------------------------------------------- effective
    def effective(self, model: KerasModel) -> dict:
        import keras
        from keras import ops

        spec, bb = model.spec, model.backbone
        # a short probe forward pass: what the GELU call is given and returns, which projection it gates
        self.run(model, [spec.bos_token_id] + [i % spec.vocab_size for i in (3, 4, 5)])
        obs = model.observed
        blocks = bb.transformer_layers
        att = [b.attention for b in blocks]
        cdt = bb.compute_dtype

        # the norm offset, observed: RMSNormalization of an all-ones row is (1 + w) or w
        n0 = blocks[0].pre_attention_norm
        w = np.asarray(ops.convert_to_numpy(n0.scale), dtype=np.float64)
        y = np.asarray(ops.convert_to_numpy(n0(ops.ones((1, 1, w.shape[0]), dtype=cdt))), np.float64)[0, 0]
        offset = "(1 + w)" if np.allclose(y, 1 + w, rtol=2e-2, atol=1e-3) else (
            "w" if np.allclose(y, w, rtol=2e-2, atol=1e-3) else "neither (1 + w) nor w")
        eps = sorted({b.pre_attention_norm.epsilon for b in blocks} | {b.pre_ffw_norm.epsilon for b in blocks})

        def qscale(a) -> float:
            d = a.head_dim if a.query_head_dim_normalize else a.hidden_dim // a.num_query_heads
            return 1 / math.sqrt(d)

        fused = _fused(model)
        rope = att[0].rope_layer
        norm_scale = float(ops.convert_to_numpy(ops.cast(ops.sqrt(bb.hidden_dim), cdt)))
        return {
            "backend": f"{keras.config.backend()}, compute dtype {cdt}",
            "activation": obs.get("gelu_kind", "?") + f" ({obs.get('gelu_args', '?')} in GemmaDecoderBlock.call; "
            f"{obs.get('gelu_evidence', 'no evidence')}; keras.ops.gelu on {keras.config.backend()} in {cdt})",
            "geglu": obs.get("geglu", "?"),
            "norm": f"{offset} in float32 (keras-hub casts to float32), cast once after the multiply, "
            f"eps {eps} in blocks, {bb.layer_norm.epsilon} final",
            "norm_placement": "sandwich" if any(b.use_post_attention_norm or b.use_post_ffw_norm for b in blocks)
            else "pre",
            "embed_scale": f"sqrt({bb.hidden_dim}) cast to the activation dtype: {norm_scale:.6g} in {cdt}",
            "query_scale": qscale(att[0]) if len({qscale(a) for a in att}) == 1 else [qscale(a) for a in att],
            "rope_base": [float(a.rope_layer.max_wavelength) for a in att],
            "rope": f"{rope.rope_type} scaling factor {rope.scaling_factor}; half-split, then q/k permuted to "
            f"interleaved order; angles float32, cos/sin in {rope.compute_dtype}",
            "attention": ("fused ops.dot_product_attention" if fused else
                          f"q * scale in {cdt} before q.k, einsum scores, softmax in float32")
            + ("" if fused is not None else " (fused path not determined)"),
            "attn_softcap": att[0].logit_soft_cap,
            "final_softcap": bb.token_embedding.logit_soft_cap,
            "window": [a.sliding_window_size if a.use_sliding_window_attention else None for a in att],
            "final_norm": True,
            "tied_head": bool(bb.token_embedding.tie_weights),
        }

    def release(self, model: KerasModel) -> None:
        model.backbone = model.lm = None
        model.observed = {}
        if "keras" in sys.modules:
            sys.modules["keras"].backend.clear_session()  # also frees keras' global name/graph state


# ------------------------------------------------------------------ helpers
def _fused(model: KerasModel) -> bool | None:
    """Whether keras-hub's attention takes its fused path here (GPU/TPU with a fused op); None: unknown."""
    try:
        return bool(model.backbone.transformer_layers[0].attention._use_fused_attention_op())
    except Exception:  # a private helper; other versions may lack it
        return None


def _verify(model: KerasModel, name: str) -> None:
    """Read the built layers back and refuse a model that is not the spec (keras-hub versions move)."""
    s, bb = model.spec, model.backbone
    found: list[tuple[str, Any, Any]] = []  # (spec field, spec value, what keras-hub built)
    for i, b in enumerate(bb.transformer_layers):
        a = b.attention
        d = a.head_dim if a.query_head_dim_normalize else a.hidden_dim // a.num_query_heads
        found += [
            ("norm_eps", s.norm_eps, b.pre_attention_norm.epsilon),
            ("norm_eps", s.norm_eps, b.pre_ffw_norm.epsilon),
            ("rope_base", s.rope_base, float(a.rope_layer.max_wavelength)),
            ("rope_scaling_factor", s.rope_scaling_factor, float(a.rope_layer.scaling_factor)),
            ("query_pre_attn_scalar", s.query_pre_attn_scalar or s.head_dim, d),
            ("attn_softcap", s.attn_softcap, a.logit_soft_cap),
            ("sliding_window", s.window_for(i), a.sliding_window_size if a.use_sliding_window_attention else None),
            ("norm_placement", s.norm_placement,
             "sandwich" if b.use_post_attention_norm or b.use_post_ffw_norm else "pre"),
        ]
    found += [
        ("norm_eps", s.norm_eps, bb.layer_norm.epsilon),
        ("final_softcap", s.final_softcap, bb.token_embedding.logit_soft_cap),
        ("tied_head", s.tied_head, bool(bb.token_embedding.tie_weights)),
    ]
    for f, want, got in found:
        if want != got:
            raise ParityInputError(
                f"{name}: the built keras-hub model has {f} = {got!r}, the spec {s.name!r} needs {want!r}; "
                f"this keras-hub version cannot express it: drop {name} from --impls for this spec"
            )


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

    installed = []  # (layer, previous instance-level call or None)
    acts = gelu_original = None
    try:
        for path in sorted(layer_paths):
            try:
                layer = _sub_layer(bb, path.removesuffix(REVERSE))
            except (KeyError, ValueError) as e:  # keras-hub renamed or restructured a layer
                if path in feeds:
                    raise ParityInputError(f"keras: cannot feed {path}: {e}") from None
                for tap, _side in by_path.get(path, []):
                    observed["missing"][tap] = f"no keras-hub layer {path} in this version ({e})"
                continue
            installed.append((layer, layer.__dict__.get("call")))
            object.__setattr__(layer, "call", wrap(layer, path))  # bypass keras attribute tracking

        # The GeGLU's GELU is a function call inside GemmaDecoderBlock.call:
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
        for layer, previous in installed:
            if previous is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)

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
