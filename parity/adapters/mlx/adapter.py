"""The `mlx` implementation: mlx-lm's own Gemma, Gemma 2, Gemma 3 and Gemma 4 (text) classes on MLX's CPU backend.

Built the way mlx-lm users load a checkpoint: an HF directory (config.json + model.safetensors in the run's
dtype) loaded by `mlx_lm.utils.load_model` (checkpoint.py). Taps are recorded from MLX itself by wrapper
modules swapped into the loaded module tree (recording.py). Decode goes through mlx-lm's own prompt cache
(`make_prompt_cache`: KVCache, and RotatingKVCache(max_size=window) on Gemma 3's local layers), one token
per call, as `mlx_lm.generate` steps it.

kv_bits (mlx_lm.generate's --kv-bits / --kv-group-size): every layer's cache is mlx-lm's QuantizedKVCache (K and V
stored by mx.quantize, affine groups along head_dim; attention through mlx_lm.models.base's
quantized_scaled_dot_product_attention), from the first token: run() goes through a fresh one too, so the
prompt's own attention reads the stored keys. (mlx_lm.generate with --quantized-kv-start 0 quantizes after the
first prefill chunk, which it attends with float keys; a later chunk, and every decode step, is what is run here.)
Its rounding is declared in held() (an act_quant affine kind), and the cache taps read it back dequantized.

What mlx-lm 0.32.2 computes (read from mlx_lm/models/gemma.py, gemma2.py, gemma3_text.py) is read back from
the built model in readback.py, and every difference from the spec is listed there; Gemma 4
(gemma4_text.py: per-layer inputs, KV-shared layers, proportional RoPE, experts) has its taps in gemma4.py.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parity.adapters.base import Adapter, DecodeResult, DecodeStep, Held, RunResult
from parity.adapters.mlx import gemma4, readback
from parity.adapters.mlx.recording import module_feeds, operand_taps, recording
from parity.adapters.registry import require_importable
from parity.errors import ParityInputError, Unsupported
from parity.model.spec import GemmaSpec
from parity.model.taps import expand_tap_map
from parity.model.weights import Weights

_L = "model.layers.{}"
_COMMON = {
    "embed": (_L.format(0), "in"),  # mlx-lm scales by sqrt(hidden) inline in the model's forward: layer 0's input
    "layers.{}.attn_norm": (_L + ".input_layernorm", "out"),
    "layers.{}.attn": (_L + ".self_attn", "out"),
    "layers.{}.mlp.gate": (_L + ".mlp.gate_proj", "out"),
    "layers.{}.mlp.up": (_L + ".mlp.up_proj", "out"),
    "layers.{}.mlp.act": (_L + ":gelu", "out"),  # nn.gelu / nn.gelu_approx, inline in MLP.__call__
    "layers.{}.mlp.hidden": (_L + ".mlp.down_proj", "in"),
    "layers.{}.mlp": (_L + ".mlp", "out"),
    "layers.{}.out": (_L, "out"),
    "final_norm": ("model.norm", "out"),
}
TAP_MAP_GEMMA1 = {  # Gemma 1: post_attention_layernorm is the PRE-MLP norm (HF's naming)
    **_COMMON,
    "layers.{}.attn_residual": (_L + ".post_attention_layernorm", "in"),
    "layers.{}.mlp_norm": (_L + ".post_attention_layernorm", "out"),
}
TAP_MAP_SANDWICH = {
    **_COMMON,
    "layers.{}.post_attn_norm": (_L + ".post_attention_layernorm", "out"),
    "layers.{}.attn_residual": (_L + ".pre_feedforward_layernorm", "in"),
    "layers.{}.mlp_norm": (_L + ".pre_feedforward_layernorm", "out"),
    "layers.{}.post_mlp_norm": (_L + ".post_feedforward_layernorm", "out"),
}
SOFTMAX_TAPS = {  # Gemma 2 computes its scores inline and calls mx.softmax on them (after softcap and mask)
    "layers.{}.attn.scores": (_L + ":softmax", "in"),
    "layers.{}.attn.probs": (_L + ":softmax", "out"),
}
FUSED_ATTENTION = ("mlx-lm's {cls} calls mx.fast.scaled_dot_product_attention, one fused kernel: the scores "
                   "and probabilities never exist as arrays")
ROPE_FUSED = "mlx-lm's nn.RoPE calls mx.fast.rope, one fused kernel: no cos table exists as an array"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Built:
    """A loaded mlx-lm model and what parity needs beside it."""

    model: object
    spec: GemmaSpec
    dtype: str
    config: dict  # config.json as load_model read it
    directory: Path
    kv_source: dict | None = None  # Gemma 4: shared layer -> the layer whose K/V it was handed (last forward)
    loading: str = ""  # a --checkpoint run: how the directory was loaded (effective()'s weights_loaded_by)
    owned: bool = True  # `directory` is parity's own (removed on release), not the user's checkpoint
    kv: tuple[int, int] | None = None  # (bits, group size) of the QuantizedKVCache every forward goes through


class MlxAdapter(Adapter):
    name = "mlx"
    decodes = True
    cannot = {"rope.cos": ROPE_FUSED}

    def __init__(self, kv_bits: int | None = None, kv_group_size: int = 64) -> None:
        from parity.numerics.act_quant import AFFINE_BITS, AFFINE_GROUPS

        if kv_bits is not None and kv_bits not in AFFINE_BITS:
            raise ParityInputError(f"mlx kv_bits={kv_bits!r}; mx.quantize takes {AFFINE_BITS} (or None: a float cache)")
        if kv_group_size not in AFFINE_GROUPS:
            raise ParityInputError(f"mlx kv_group_size={kv_group_size!r}; mx.quantize takes {AFFINE_GROUPS}")
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        if kv_bits is not None:
            self.name = f"mlx-kv{kv_bits}"

    def version(self) -> str:
        from importlib.metadata import version

        return f"mlx-lm {version('mlx-lm')} / mlx {version('mlx')}"

    def settings(self) -> dict[str, str]:
        if self.kv_bits is None:
            return {"kv_cache": "float (KVCache / RotatingKVCache, the run's dtype)"}
        return {"kv_cache": f"QuantizedKVCache(group_size={self.kv_group_size}, bits={self.kv_bits}) from the "
                            "first token", "kv_bits": str(self.kv_bits), "kv_group_size": str(self.kv_group_size)}

    def held(self, spec: GemmaSpec, weights: Weights, dtype: str) -> Held | None:
        """The given weights; with kv_bits, K and V rounded as mx.quantize stores them (scales and biases in the
        run's dtype), the query and probabilities left float (mx.quantized_matmul dequantizes the cache)."""
        from parity.numerics.act_quant import affine_kind

        if self.kv_bits is None:
            return None
        return Held(weights, "as given", None, affine_kind(self.kv_bits, self.kv_group_size, dtype))

    def check(self, spec: GemmaSpec, dtype: str) -> None:
        require_importable(self.name, "mlx", "mlx_lm")
        if dtype not in DTYPES:
            raise Unsupported(f"mlx runs {', '.join(DTYPES)}, not {dtype}; drop 'mlx' from --impls for it")
        if spec.family == 4:
            try:
                __import__("mlx_lm.models.gemma4_text")
            except ImportError:
                from importlib.metadata import version

                raise Unsupported(f"mlx: mlx-lm {version('mlx-lm')} has no Gemma 4 (mlx_lm.models.gemma4_text): "
                                  "pip install 'mlx-lm>=0.32' or drop 'mlx' from --impls") from None
            gemma4.check(spec)
            self._check_kv(spec)
            return
        if spec.family not in (1, 2, 3):
            raise Unsupported(f"mlx: Gemma {spec.family} is not mapped by parity's mlx adapter; drop 'mlx' from "
                              "--impls for this spec")
        fixed = {  # what mlx-lm's Gemma classes hard-code and no config key changes
            "norm_unit_offset": True, "embed_scale": True,
            "norm_placement": "pre" if spec.family == 1 else "sandwich",
            "qk_norm": spec.family == 3,
        }
        for f, want in fixed.items():
            if getattr(spec, f) != want:
                raise Unsupported(f"mlx cannot build {f}={getattr(spec, f)!r} for Gemma {spec.family} (mlx-lm "
                                  f"hard-codes {want!r}); drop 'mlx' from --impls for this spec")
        if not spec.tied_head and spec.family < 3:
            raise Unsupported(f"mlx-lm's Gemma {spec.family} always ties its head to the embedding (as_linear); "
                              "drop 'mlx' from --impls for an untied spec")
        if spec.family == 2 and (spec.attn_softcap is None or spec.final_softcap is None):
            raise Unsupported("mlx-lm's Gemma 2 always soft-caps (it divides by the cap; a null cap cannot be "
                              "built); drop 'mlx' from --impls for a Gemma 2 spec without softcaps")
        self._check_kv(spec)

    def _check_kv(self, spec: GemmaSpec) -> None:
        if self.kv_bits is None:
            return
        if spec.family == 2 or spec.family == 4:
            raise Unsupported(f"{self.name}: mlx-lm's Gemma {spec.family} attention does not go through "
                              "scaled_dot_product_attention's quantized path (a QuantizedKVCache's tuples cannot be "
                              "read there); drop kv_bits for this spec")
        if spec.layer_types and "local" in spec.layer_types:
            raise Unsupported(f"{self.name}: Gemma 3's local layers use RotatingKVCache, whose to_quantized raises "
                              "NotImplementedError in mlx-lm ('RotatingKVCache Quantization NYI'); use a spec "
                              "without local layers or drop kv_bits")
        if spec.head_dim % self.kv_group_size:
            raise ParityInputError(f"{self.name}: head_dim {spec.head_dim} is not a multiple of kv_group_size "
                                   f"{self.kv_group_size} (mx.quantize groups along head_dim); use kv_group_size "
                                   f"{spec.head_dim if spec.head_dim in (32, 64, 128) else 32}")

    def build(self, spec: GemmaSpec, weights: Weights, dtype: str) -> Built:
        from parity.adapters.mlx import checkpoint

        ck = weights.checkpoint
        loading = ""
        if ck is not None and ck.layout == "hf":
            try:  # the shipped directory, as mlx-lm's users load it
                model, config, loading = checkpoint.load_shipped(Path(ck.directory), dtype)
                return Built(model, spec, dtype, config, Path(ck.directory), loading=loading, owned=False,
                             kv=self._kv())
            except Exception as e:  # noqa: BLE001 -- whatever mlx-lm raises is said in the run
                loading = (f"parity's HF writer (mlx/checkpoint.py): mlx-lm's load_model({ck.directory}) failed: "
                           f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        elif ck is not None:
            loading = f"parity's HF writer (mlx/checkpoint.py): mlx-lm loads HF directories, not a {ck.layout} layout"
        directory = Path(tempfile.mkdtemp(prefix=f"parity-mlx-{spec.name}-{dtype}-"))
        try:
            checkpoint.write(spec, weights, dtype, directory)
            model, config = checkpoint.load(directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return Built(model, spec, dtype, config, directory, loading=loading, kv=self._kv())

    def _kv(self) -> tuple[int, int] | None:
        return (self.kv_bits, self.kv_group_size) if self.kv_bits is not None else None

    def _cache(self, built: Built):
        """mlx-lm's prompt cache, every layer a fresh QuantizedKVCache when kv_bits is set (what
        maybe_quantize_kv_cache makes of an empty KVCache); None for a plain forward without kv_bits."""
        from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

        if built.kv is None:
            return None
        bits, group = built.kv
        return [QuantizedKVCache(group_size=group, bits=bits) for _ in make_prompt_cache(built.model)]

    # ------------------------------------------------------------ taps
    def _tap_map(self, spec: GemmaSpec) -> dict[str, tuple[str, str]]:
        if spec.family == 4:
            return gemma4.tap_map(spec)
        template = dict(TAP_MAP_GEMMA1 if spec.family == 1 else TAP_MAP_SANDWICH)
        if spec.family == 2:
            template.update(SOFTMAX_TAPS)
        return expand_tap_map(template, spec)

    def _inline(self, built: Built) -> dict:
        import mlx.core as mx
        import mlx.nn as nn

        if built.spec.family == 4:
            return gemma4.inline()
        inline = {"gelu": (nn, ["gelu", "gelu_approx", "gelu_fast_approx"], "out")}
        if built.spec.family == 2:
            inline["softmax"] = (mx, ["softmax"], "out")
        return inline

    def _unavailable(self, built: Built, taps: dict) -> dict[str, str]:
        spec, out = built.spec, {}
        if spec.family == 4:
            return gemma4.unavailable(spec, taps)
        for i in range(spec.num_layers):
            for t in ("attn.scores", "attn.probs"):
                tap = f"layers.{i}.{t}"
                if tap not in taps:
                    out[tap] = (FUSED_ATTENTION.format(cls=type(built.model.model.layers[i].self_attn).__module__
                                                      .rsplit(".", 1)[-1] + ".Attention")
                                if spec.family != 2 else "mx.softmax was not called in this layer's attention")
        return out

    def _forward(self, built: Built, ids: list[list[int]] | list[int], feed=None, cache=None):
        """One forward of mlx-lm's model with every tap recorded: (taps, logits as an mx array, recorder)."""
        import mlx.core as mx

        spec = built.spec
        tap_map = self._tap_map(spec)
        layers = [_L.format(i) for i in range(spec.num_layers)]
        watch = gemma4.scalar_watch(built.model) if spec.family == 4 else []
        with operand_taps(watch) as scaled, \
                recording(built.model, tap_map, module_feeds(tap_map, feed), self._inline(built), layers) as rec:
            logits = built.model(mx.array([ids]), cache=cache)
            mx.eval(logits)
            taps = rec.finish()
        taps.update(scaled)
        taps["logits"] = _np(logits)
        if spec.family == 4:
            gemma4.finish(taps, spec)
            built.kv_source = gemma4.kv_sources(built.model, rec.objects)
        for tap in [t for t in taps if t.endswith(("attn.scores", "attn.probs"))]:
            taps[tap] = _heads(taps[tap], tap.endswith("scores"), built.dtype)
        return taps, rec

    def run(self, model: Built, tokens, feed=None) -> RunResult:
        taps, _ = self._forward(model, list(tokens), feed, cache=self._cache(model))
        return RunResult(taps, self._unavailable(model, taps))

    # ------------------------------------------------------------ decode
    def decode(self, model: Built, prompt, continuation) -> DecodeResult:
        """Prefill through mlx-lm's prompt cache, then one call per token, as mlx_lm.generate steps it."""
        from mlx_lm.models.cache import make_prompt_cache

        cache = self._cache(model) or make_prompt_cache(model.model)
        shadow = readback.PositionShadow(cache)
        self._forward(model, list(prompt), cache=cache)
        steps, unavailable = [], {}
        source = getattr(model.model.model, "previous_kvs", None)  # Gemma 4: KV-shared layers have no cache
        for token in continuation:
            taps, _ = self._forward(model, [int(token)], cache=cache)
            views = shadow.views(cache)
            if source is not None:  # a shared layer's view is its source's cache, which its attention reads
                views.update({i: views[j] for i, j in enumerate(source) if i not in views})
            steps.append(DecodeStep(taps=taps, cache=views))
            unavailable = self._unavailable(model, taps)
        return DecodeResult(steps, unavailable)

    # ------------------------------------------------------------ readback
    def effective(self, model: Built) -> dict:
        if model.spec.family == 4 and model.kv_source is None:  # observed in a forward: run one
            self._forward(model, [model.spec.bos_token_id])
        out = readback.effective(model, self._probe(model))
        if model.loading:
            out["library"]["weights_loaded_by"] = model.loading
        if model.spec.family == 4:  # as hf: which layer's K/V each shared layer reads, beside the properties
            out["kv_source"] = out["library"]["kv_source"]
        return out

    def _probe(self, built: Built) -> dict:
        """One token through the model with layer 0's GELU input and both projections recorded: which GELU
        function the MLP calls, and which projection it takes."""
        import mlx.core as mx

        if built.spec.family == 4:
            return self._probe_gemma4(built)
        taps = {"in": (_L.format(0) + ":gelu", "in"), "gate": (_L.format(0) + ".mlp.gate_proj", "out"),
                "up": (_L.format(0) + ".mlp.up_proj", "out")}
        with recording(built.model, taps, None, self._inline(built), [_L.format(0)]) as rec:
            mx.eval(built.model(mx.array([[built.spec.bos_token_id]])))
            got = rec.finish()
        gelu = rec.calls.get(_L.format(0) + ":gelu")
        geglu = ("gate" if np.array_equal(got.get("in"), got["gate"]) else
                 "up" if np.array_equal(got.get("in"), got["up"]) else "neither projection")
        return {"gelu": gelu, "geglu": geglu}

    def _probe_gemma4(self, built: Built) -> dict:
        """Gemma 4's MLP calls one compiled `geglu(gate, up)`: its GELU is read by calling that function on the
        GELU probe (times ones), and the projection it gates by comparing layer 0's down-projection input on
        one token with geglu(gate, up) and geglu(up, gate) of the recorded projections."""
        import mlx.core as mx
        from mlx_lm.models import gemma4_text

        from parity.model.effective import GELU_PROBE

        taps = {"hidden": (_L.format(0) + ".mlp.down_proj", "in"), "gate": (_L.format(0) + ".mlp.gate_proj", "out"),
                "up": (_L.format(0) + ".mlp.up_proj", "out")}
        with recording(built.model, taps, None, None, [_L.format(0)]) as rec:
            mx.eval(built.model(mx.array([[built.spec.bos_token_id]])))
            got = rec.finish()
        x = mx.array(GELU_PROBE, mx.float32)
        act = np.array(gemma4_text.geglu(x, mx.ones_like(x))).tolist()
        g, u = (mx.array(np.asarray(got[k], np.float32)).astype(built.model.model.embed_tokens.weight.dtype)
                for k in ("gate", "up"))
        hidden = np.asarray(got["hidden"], np.float32)
        same = lambda y: np.array_equal(np.array(y.astype(mx.float32)), hidden)  # noqa: E731
        geglu = "gate" if same(gemma4_text.geglu(g, u)) else "up" if same(gemma4_text.geglu(u, g)) else \
            "neither projection"
        return {"gelu_values": act, "gelu": "gemma4_text.geglu (mx.compile'd nn.gelu_approx)", "geglu": geglu}

    def release(self, model: Built) -> None:
        if model.owned:  # never the user's checkpoint
            shutil.rmtree(model.directory, ignore_errors=True)
        model.model = None


def _np(x) -> np.ndarray:
    from parity.adapters.mlx.recording import to_numpy

    return to_numpy(x)


def _heads(a: np.ndarray, scores: bool, dtype: str) -> np.ndarray:
    """Gemma 2's grouped scores [kv, repeats, T, S] (or [n, T, S]) as [n, T, S]: query head h = kv * repeats + r,
    the order its reshape of the queries gives. The masked scores mlx-lm fills with finfo(dtype).min become
    -inf, as the contract writes masked entries (a softcapped score is never near that value)."""
    a = a.reshape(-1, *a.shape[-2:])
    if not scores:
        return a
    import ml_dtypes

    lowest = float(ml_dtypes.finfo(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)).min)
    wide = np.asarray(a, np.float32)
    return np.where(wide == np.float32(lowest), np.float32(-np.inf), wide)
