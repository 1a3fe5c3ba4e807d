"""KerasAdapter: keras-hub's Gemma 1, Gemma 2 and Gemma 3 (text), built from a spec and run eagerly.

Gemma 1 and 2 are one keras-hub class, `keras_hub.models.GemmaBackbone` (+
`GemmaCausalLM`), with Gemma 2 switched on by its options; Gemma 3 text is
`keras_hub.models.Gemma3Backbone` (+ `Gemma3CausalLM`) with no vision encoder.
`spec.family` picks the class; every number comes from the spec's fields,
through keras-hub's options (parity.formats.keras_hub), and what keras-hub
builds instead is read back (readback.py) rather than assumed.

keras and keras-hub are imported inside the methods, after KERAS_BACKEND is
set: one process runs one keras backend, so `keras-jax` and `keras-torch`
need separate processes (separate report runs).

Taps are recorded while keras-hub runs its own eager forward pass
(recording.py). Sandwich norms are sub-layers too: `post_attn_norm` is the
output of the block's `post_attention_norm`, `post_mlp_norm` of its
`post_ffw_norm`, and `attn_residual` is the input of `pre_ffw_norm` (x +
post-normed attention).

Decoding (`decode`) runs keras-hub's incremental path as `generate()` does:
`_build_cache` prefills a buffer of the prompt followed by pad ids, then one
eager `call_with_cache(token, cache, p)` per continuation token, recorded by
the same recorder as `run`. keras-hub's cache is a dense buffer with one slot
per position on every layer (local layers too: the sliding window is a mask,
`_mask_sliding_window` sliced at `cache_update_index`), so the cache views are
slots 0..p read straight out of it, keys un-permuted from GemmaBackbone's
interleaved post-RoPE layout to half-split.
"""

from __future__ import annotations

import inspect
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from parity.adapters.base import DTYPES, Adapter, DecodeResult, DecodeStep, RunResult
from parity.adapters.keras_hub import gemma4, readback
from parity.adapters.keras_hub.recording import COS, GELU, REVERSE, Inline, Recorder, call_order
from parity.adapters.registry import backend_missing
from parity.errors import ParityInputError, Unsupported
from parity.formats.keras_hub import backbone_kwargs, class_names, inexpressible, name_map, split_names
from parity.formats.keras_hub import to_layout as keras_layout
from parity.model.spec import GemmaSpec
from parity.model.taps import expand_tap_map, layer_of, tap_names
from parity.model.weights import Weights, map_weights

BACKENDS = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}  # keras backend -> pip package
DEFAULT_BACKEND = "jax"

# Pseudo-paths that are not keras layers (GELU, REVERSE, COS) are defined with the recorder.
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
    loading: str = ""  # how a checkpoint directory's weights were loaded (Gemma 4: keras-hub's from_preset or not)


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
                raise backend_missing(self.name, f"keras on the {self.backend!r} backend ({e})") from None
        try:
            with _quiet_stderr():
                import keras_hub as hub
        except ImportError:
            try:
                import keras_nlp as hub
            except ImportError:
                raise backend_missing(self.name, "keras-hub") from None
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
                raise backend_missing(self.name, "keras-hub")
            return
        self._import()

    # -------------------------------------------------------------- build
    def build(self, spec: GemmaSpec, weights: Weights, dtype: str) -> KerasModel:
        self.check(spec, dtype)
        _, hub = self._import()
        kwargs = backbone_kwargs(spec)
        backbone_name, lm_name = class_names(spec)
        if not hasattr(hub.models, backbone_name):
            raise Unsupported(f"{self.name}: keras-hub {getattr(hub, '__version__', '?')} has no {backbone_name} "
                              f"(family={spec.family}); pip install -U keras-hub, or drop it from --impls")
        loading = ""
        if spec.family == 4 and weights.checkpoint is not None:
            backbone, loading = self._from_checkpoint(hub, backbone_name, kwargs, spec, weights, dtype)
        else:
            backbone = self._filled(getattr(hub.models, backbone_name), kwargs, spec, weights, dtype)
        lm = getattr(hub.models, lm_name)(backbone=backbone, preprocessor=None)
        model = KerasModel(spec, dtype, self.backend, backbone, lm, requested=kwargs, loading=loading)
        model.differences = (gemma4.differences(spec, backbone) if spec.family == 4
                             else readback.differences(spec, backbone))
        return model

    def _from_checkpoint(self, hub, backbone_name: str, kwargs: dict, spec: GemmaSpec, weights: Weights,
                         dtype: str):
        """(backbone, how it was loaded) for weights read from a checkpoint directory: keras-hub loads the
        directory its own way, as its users do (`from_preset`: a saved preset, or an HF directory through
        keras-hub's own transformers converter), so a converter that drops or mistranslates a setting shows
        in `differences` (the built layers against the spec parity read from the same config.json) and in
        the run. Where keras-hub cannot take the files, parity's own conversion is the fallback, and the
        reason is the run's library fact `weights_loaded_by`."""
        ck = weights.checkpoint
        how = "its transformers converter" if ck.layout == "hf" else "its preset loader"
        try:
            backbone = getattr(hub.models, backbone_name).from_preset(ck.directory, dtype=dtype)
        except Exception as e:  # noqa: BLE001 -- whatever keras-hub raises is the finding, said in the run
            msg = " ".join(str(e).split())[:300]
            backbone = self._filled(getattr(hub.models, backbone_name), kwargs, spec, weights, dtype)
            return backbone, (f"parity's conversion: keras-hub {getattr(hub, '__version__', '?')} "
                              f"{backbone_name}.from_preset({ck.directory}) ({how}) failed: {type(e).__name__}: {msg}")
        return backbone, f"keras-hub {getattr(hub, '__version__', '?')} {backbone_name}.from_preset({ck.directory}) ({how})"

    def _filled(self, backbone_cls, kwargs: dict, spec: GemmaSpec, weights: Weights, dtype: str):
        """The backbone with the weights in its variables, loaded one tensor at a time."""
        import keras
        import ml_dtypes

        # bfloat16 buffers for a bfloat16 model on JAX (which takes ml_dtypes arrays as they are)
        buf_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" and self.backend == "jax" else np.float32

        def load(path: str) -> np.ndarray:
            name = plan[path].name  # `whole#part`: that part of the canonical tensor `whole`
            whole = name.split("#")[0]
            t = np.empty(weights.shape(whole), buf_dtype)
            weights.read_into(whole, t)
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
            planned = {name: _Planned(name, keras_layout(name, np.empty(weights.shape(whole), np.uint8), spec).shape)
                       for whole in weights.tensors for name in split_names(whole)}
            plan = map_weights(planned, name_map(spec), shapes, where=f"{self.name} weights")
            deferred = all(getattr(v, "_value", 0) is None and hasattr(v, "_initializer") for v in variables.values())
            if deferred:
                for path, v in variables.items():  # in the variable's dtype, as assign would cast it
                    v._initializer = lambda shape, dtype=None, _p=path: keras.ops.convert_to_tensor(load(_p), dtype)
        if not deferred:
            for path, v in variables.items():
                v.assign(load(path))  # cast to the variable dtype; canonical weights are bf16-exact
        return backbone

    # ---------------------------------------------------------------- run
    def run(self, model: KerasModel, tokens: list[int], feed: dict[str, np.ndarray] | None = None) -> RunResult:
        spec = model.spec
        self._check_ids(spec, tokens, "tokens", empty_ok=False)
        tap_map = expand_tap_map(_tap_template(spec), spec)
        ids = np.asarray([tokens], dtype="int32")
        inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        if spec.family == 4:  # Gemma4Backbone takes the positions as an input
            inputs["position_ids"] = np.arange(len(tokens), dtype="int32")[None]
        clean = not feed  # an unfed run shows what the model does by itself: effective() reads the latest
        attention = model.backbone.transformer_layers[0].attention
        recorder, observed = _recorder(model, tap_map, _feeds(spec, feed, len(tokens)))
        with recorder, call_order(attention if clean else None, readback.QK_ROPE_CALLS) as order:
            model.lm(inputs, training=False)  # keras-hub's own eager forward pass, logits included
        _finish(spec, recorder, tap_map)
        readback.geglu_order(observed, recorder.taps)
        model.observed = observed
        if clean:
            model.clean = {**observed, "call_order": list(order)}
        return RunResult(dict(recorder.taps), readback.unavailable(spec.num_layers, model.backbone, tap_map,
                                                                   recorder.taps, observed["missing"]))

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
        tap_map = expand_tap_map(_tap_template(spec), spec)
        # generate()'s buffer: the prompt, then the preprocessor's pad id (0) where tokens are to come;
        # the pads' keys are written by the prefill and overwritten one by one as the decode reaches them
        ids = np.zeros((1, slots), "int32")
        ids[0, :P] = prompt
        padding = np.zeros((1, slots), bool)
        padding[0, :P] = True
        step_params = inspect.signature(lm.call_with_cache).parameters
        # GemmaBackbone stores q and k permuted to interleaved order after RoPE; the view un-permutes the
        # keys to the half-split layout every other implementation (and the contract) uses
        permuted = ([False if gemma4.rope_is_half_split(b.attention) else None
                     for b in model.backbone.transformer_layers] if spec.family == 4 else
                    [readback.permuted_after_rope(b.attention) for b in model.backbone.transformer_layers])
        steps: list[DecodeStep] = []
        missing: dict = {}
        with _inference(self.backend):
            cache = _prefill(lm, ids, padding)
            for s, token in enumerate(continuation):
                p = P + s
                ids[0, p] = token  # where generate()'s sampler writes the token it chose
                kw = {}
                if "cache_update_mask" in step_params:  # generate(): ~padding_mask, True past the prompt
                    kw["cache_update_mask"] = ops.convert_to_tensor(~padding[:, p:p + 1])
                recorder, _ = _recorder(model, tap_map, {})  # the same wrappers as run()
                with recorder:  # an int tensor index, as generate()'s loop passes it
                    _, _, cache = lm.call_with_cache(ops.convert_to_tensor(ids[:, p:p + 1]), cache,
                                                     ops.convert_to_tensor(p, "int32"), **kw)
                _finish(spec, recorder, tap_map)
                missing = recorder.missing
                views = (gemma4.cache_views(cache, model.backbone, model.dtype, p) if spec.family == 4 else
                         readback.cache_views(cache, spec.num_layers, model.dtype, p, permuted))
                probs = {i: np.arange(slots) for i in range(spec.num_layers)
                         if f"layers.{i}.attn.probs" in recorder.taps}
                steps.append(DecodeStep(taps=dict(recorder.taps), cache=views, key_positions=probs))
        unavailable = readback.unavailable(spec.num_layers, model.backbone, tap_map, steps[-1].taps,
                                           missing) if steps else {}
        _drop_unknown_layout(steps, unavailable, permuted)
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
        spec = model.spec
        # what the GELU call is given and returns, which projection it gates, and in which order block 0's
        # attention calls its q norm and its RoPE: seen in the last unfed run, else in a short probe pass
        # (a new prompt length costs a fresh XLA compile, most of the harness's overhead on tiny shapes)
        if not model.clean:
            self.run(model, [spec.bos_token_id] + [i % spec.vocab_size for i in (3, 4, 5)])
        if spec.family == 4:
            out = gemma4.effective(spec, model.backbone, model.lm, model.clean, model.differences)
            if model.loading:
                out["library"]["weights_loaded_by"] = model.loading
            return out
        return readback.effective(model.backbone, model.lm, model.clean, model.differences)

    def release(self, model: KerasModel) -> None:
        model.backbone = model.lm = None
        model.observed, model.clean = {}, {}
        if "keras" in sys.modules:
            sys.modules["keras"].backend.clear_session()  # also frees keras' global name/graph state


# ------------------------------------------------------------------ helpers
def _tap_template(spec: GemmaSpec) -> dict:
    return gemma4.TAP_MAP if spec.family == 4 else TAP_MAP


def _finish(spec: GemmaSpec, recorder: Recorder, tap_map: dict) -> None:
    """Gemma 4: the taps read off recorded values (moe.weights), and why a hooked tap is missing."""
    if spec.family == 4:
        gemma4.finish(recorder.taps, spec.num_layers, recorder.missing)
        gemma4.pseudo_missing(tap_map, recorder.taps, recorder.missing)


def _recorder(model: KerasModel, tap_map: dict, feeds: dict) -> tuple[Recorder, dict]:
    """A recorder for keras-hub's decoder blocks, and the dict its GELU observation fills (block 0's first call)."""
    bb = model.backbone
    observed: dict = {}
    blocks = [f"decoder_block_{i}" for i in range(model.spec.num_layers)]
    if model.spec.family == 4:  # the MLP, the router's top-k and the layer scalar are inline: hooks
        def observe(x, y, args, kwargs, original):
            readback.gelu_observation(x, y, args, kwargs, original, observed)

        recorder = Recorder(bb, gemma4.recorder_map(tap_map), feeds, blocks=blocks,
                            hooks=gemma4.hooks(bb.transformer_layers, observe))
        observed["missing"] = recorder.missing
        return recorder, observed
    # The GeGLU's GELU is a function call inside the decoder block's call:
    # wrap the `gelu` that the block's module finds in keras.activations.
    block_module = sys.modules[type(bb.transformer_layers[0]).__module__]
    gelu = Inline(
        namespace=getattr(getattr(block_module, "keras", None), "activations", None), name=GELU,
        tap="layers.{}.mlp.act", label="keras.activations.gelu",
        absent=f"{block_module.__name__} does not call keras.activations.gelu in this keras-hub version",
        on_first=lambda x, y, args, kwargs, original: readback.gelu_observation(x, y, args, kwargs, original,
                                                                                observed))
    recorder = Recorder(bb, tap_map, feeds, blocks=blocks, inline=gelu)
    observed["missing"] = recorder.missing
    return recorder, observed


def _prefill(lm, ids: np.ndarray, padding: np.ndarray):
    """keras-hub's cache after `_build_cache` of generate()'s buffer."""
    from keras import ops

    # Gemma3CausalLM's generate() passes its padding mask to the prefill (None for images);
    # GemmaCausalLM's takes the token ids alone
    build_params = list(inspect.signature(lm._build_cache).parameters)[1:]
    extra = {n: (ops.convert_to_tensor(padding) if n == "padding_mask" else None) for n in build_params}
    _, cache = lm._build_cache(ops.convert_to_tensor(ids), **extra)
    return cache


def _drop_unknown_layout(steps: list[DecodeStep], unavailable: dict, permuted: list) -> None:
    """A layer whose key layout could not be read back shows no cache, and says why."""
    for i, known in enumerate(permuted):
        if known is None:
            for name in ("cache.k", "cache.v"):
                unavailable[f"layers.{i}.{name}"] = (
                    "could not tell whether this keras-hub permutes the keys after RoPE (private _apply_rope)")
            for step in steps:
                step.cache.pop(i, None)


def _feeds(spec: GemmaSpec, feed: dict[str, np.ndarray] | None, n_tokens: int) -> dict[str, np.ndarray]:
    """Isolated mode: tap -> reference input becomes keras layer path -> array [T, width]."""
    if not feed:
        return {}
    entries = []
    feed_map = gemma4.FEED_MAP if spec.family == 4 else FEED_MAP
    feed = gemma4.feedable(spec, feed) if spec.family == 4 else feed
    for tap, value in feed.items():
        i = layer_of(tap)
        key = tap if i is None else tap.replace(f"layers.{i}.", "layers.{}.", 1)
        if key not in feed_map or tap not in tap_names(spec):
            raise ParityInputError(
                f"keras: cannot feed tap {tap!r}: it is not the output of a keras-hub sub-layer; "
                f"feedable taps look like {', '.join(sorted(feed_map))}"
            )
        width = spec.intermediate_size if key in ("layers.{}.mlp.act",) else spec.hidden_size
        value = np.asarray(value)
        if value.shape != (n_tokens, width):
            raise ParityInputError(
                f"keras: feed for {tap!r} has shape {value.shape}, the input it replaces is {(n_tokens, width)}"
            )
        entries.append((feed_map[key], i, value))
    out = {}
    for paths, i, value in sorted(entries, key=lambda e: -len(e[0])):  # one-path entries applied last: they win
        for p in paths:
            out[p if i is None else p.format(i)] = value
    return out



@contextmanager
def _inference(backend: str):
    """No autograd graph on torch: the cache of each step would otherwise hold every earlier step's graph."""
    if backend != "torch":
        yield
        return
    import torch

    with torch.no_grad():
        yield



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
