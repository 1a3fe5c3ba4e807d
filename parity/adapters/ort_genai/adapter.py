"""`OrtGenaiAdapter`: Gemma 1/2/3 built by onnxruntime-genai's own model builder, run through its generator.

build: the builder's model (build.py), a copy of its graph with every tap a graph output (graph.py), and an
`og.Model` on that copy. run: `og.Generator.append_tokens(tokens)` (the prefill), then `get_output(value)` per
tap. decode: the same generator, one `append_tokens([t])` per continuation token, through its own cache
(`present.{i}.key/value`). Activations are float32 on CPU whatever the precision; `int8` / `int4` quantize the
weights (MatMulNBits) and, inside each MatMulNBits, the activations (int8 per block): `held` gives the weights the
built model holds and that activation rounding (held.py), the honest reference of those runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from parity.adapters.base import Adapter, CacheView, DecodeResult, DecodeStep, Held, RunResult
from parity.adapters.registry import backend_missing
from parity.errors import Unsupported
from parity.model.spec import GemmaSpec
from parity.model.weights import Weights

FUSED = ("the attention scores and probabilities are computed inside onnxruntime's fused GroupQueryAttention "
         "operator (rotary, softcap, window and softmax in one kernel): no graph value holds them")
# The quantizer's choices, passed to the builder explicitly (its own CPU defaults in 0.18, written out so a
# default that changes in another version changes the build key and shows in settings(), not silently).
QUANT_OPTIONS = {"block_size": "32", "accuracy_level": "4", "is_symmetric": "true"}
WINDOWED = ("the sliding layers' cache is genai's windowed buffer (window + slack slots, compacted when full); "
            "how many of its slots are live is kept inside the generator, not in any output")


@dataclass
class OrtModel:
    spec: GemmaSpec
    og_model: Any
    run_dir: Path
    built: Path
    graph: Any  # the onnx ModelProto as run (taps exposed, any edit applied)
    values: dict[str, str]  # canonical tap -> ONNX value
    command: list[str]
    shim: bool
    precision: str
    norm0: np.ndarray  # the canonical weight of layer 0's first norm, to read the unit offset back
    max_length: int  # genai_config.json's search.max_length: the generator's default
    notes: dict = field(default_factory=dict)
    loading: str = ""  # a --checkpoint run: how the directory was built (effective()'s weights_loaded_by)


class OrtGenaiAdapter(Adapter):
    name = "ort-genai"
    decodes = True

    def __init__(self, precision: str = "fp32", edit: Callable[[Any], None] | None = None) -> None:
        from parity.adapters.ort_genai.build import PRECISIONS

        if precision not in PRECISIONS:
            raise ValueError(f"ort-genai precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.edit = edit  # applied to the built ONNX graph before it runs (fault injection in tests)
        self._builds: dict[str, tuple] = {}  # weights hash -> `_built`'s answer
        if precision != "fp32":
            self.name = f"ort-genai-{precision}"

    def version(self) -> str:
        import onnxruntime
        import onnxruntime_genai

        return f"onnxruntime-genai {onnxruntime_genai.__version__} / onnxruntime {onnxruntime.__version__} " \
               f"({self.precision}, CPU)"

    def check(self, spec: GemmaSpec, dtype: str) -> None:
        for pkg in ("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir"):
            try:
                __import__(pkg)
            except ImportError:
                raise backend_missing(self.name, pkg) from None
        if dtype != "float32":
            raise Unsupported(f"{self.name} computes in float32 on CPU (the builder's CPU precisions fp32, int8 and "
                              f"int4 are weight types), not {dtype}; use --dtypes float32 for it")
        if spec.family not in (1, 2, 3):
            raise Unsupported(f"{self.name}: Gemma {spec.family} is not wired here yet; drop it from --impls")
        fixed = {"norm_unit_offset": True, "embed_scale": True, "embed_scale_dtype": "activation",
                 "norm_placement": "pre" if spec.family == 1 else "sandwich", "qk_norm": spec.family == 3,
                 "gelu_approximate": "tanh"}
        for f, want in fixed.items():
            if getattr(spec, f) != want:
                raise Unsupported(f"{self.name} cannot build {f}={getattr(spec, f)!r} for Gemma {spec.family} (the "
                                  f"builder hard-codes {want!r}); drop it from --impls for this spec")
        if spec.family == 1 and (spec.query_pre_attn_scalar or spec.rope_scaling_factor != 1.0):
            raise Unsupported(f"{self.name}: Gemma 1 has no query_pre_attn_scalar or rope scaling in HF's config; "
                              "drop it from --impls")

    def build(self, spec: GemmaSpec, weights: Weights, dtype: str) -> OrtModel:
        import onnxruntime_genai as og

        from parity.adapters.ort_genai import build, graph

        folder, command, shim, loading = self._built(spec, weights)
        model = graph.load(folder)
        values = graph.tap_values(model, spec)
        graph.expose(model, values.values())
        if self.edit is not None:
            self.edit(model)
        run_dir = graph.save_run_dir(model, folder, Path(tempfile.mkdtemp(prefix="run-", dir=folder.parent)))
        norm0 = np.empty(weights.shape("model.layers.0.input_layernorm.weight"), np.float32)
        weights.read_into("model.layers.0.input_layernorm.weight", norm0)
        max_length = int(json.loads((folder / "genai_config.json").read_text())["search"]["max_length"])
        return OrtModel(spec, og.Model(str(run_dir)), run_dir, folder, model, values, command, shim,
                        self.precision, norm0, max_length, loading=loading)

    def _built(self, spec: GemmaSpec, weights: Weights) -> tuple[Path, list[str], bool, str]:
        """(the builder's folder, its command, shim, how the weights were loaded): a --checkpoint HF directory
        built as shipped (`-i DIR`), else (or where the builder fails on it) from parity's HF writer."""
        from parity.adapters.ort_genai import build

        if weights.hash in self._builds:  # build() and held() share one build (or one failed try)
            return self._builds[weights.hash]
        ck = weights.checkpoint
        loading = ""
        if ck is not None and ck.layout == "hf":
            try:
                folder, command, shim = build.built_shipped(spec, weights, Path(ck.directory), self.precision,
                                                            self.options())
                how = f"onnxruntime-genai's model builder on {ck.directory} (-i, as shipped)"
                self._builds[weights.hash] = (folder, command, shim, how)
                return self._builds[weights.hash]
            except RuntimeError as e:
                loading = f"parity's HF writer (ort_genai/build.py): the builder on {ck.directory} failed: {e}"
        elif ck is not None:
            loading = f"parity's HF writer (ort_genai/build.py): the builder takes HF directories, not {ck.layout}"
        self._builds[weights.hash] = (*build.built(spec, weights, self.precision, self.options()), loading)
        return self._builds[weights.hash]

    def options(self) -> dict[str, str] | None:
        """The builder's extra options for this precision (None for fp32: nothing is quantized)."""
        return None if self.precision == "fp32" else dict(QUANT_OPTIONS)

    def settings(self) -> dict[str, str]:
        if self.precision == "fp32":
            return {"precision": "fp32 (float32 weights and activations)"}
        o = QUANT_OPTIONS
        bits = self.precision[3:]
        # what 0.18's builder does with a tied embedding (base.py make_tied_embeddings_init: only 4-bit gathers)
        embed = ("a tied embedding gathers lm_head's 4-bit codes (GatherBlockQuantized)" if bits == "4" else
                 "a tied embedding stays float32 beside the 8-bit lm_head (untied)")
        return {"precision": f"{self.precision} (MatMulNBits {bits}-bit projections and lm_head; {embed})",
                "block_size": o["block_size"], "symmetric": o["is_symmetric"],
                "accuracy_level": f"{o['accuracy_level']} (activations quantized to int8 per block of "
                                  f"{o['block_size']} inside MatMulNBits)"}

    def held(self, spec: GemmaSpec, weights: Weights, dtype: str) -> Held | None:
        """int8 / int4: the weights dequantized from the built model's own initializers (held.py), built here
        once and cached, so `build` loads the same folder."""
        if self.precision == "fp32":
            return None
        from parity.adapters.ort_genai import build
        from parity.adapters.ort_genai.held import held_weights

        folder = self._built(spec, weights)[0]
        w, quant = held_weights(spec, folder)
        return Held(w, quant.weight_type(), quant.activations())

    def _generator(self, model: OrtModel, max_length: int):
        import onnxruntime_genai as og

        params = og.GeneratorParams(model.og_model)
        # genai_config's own max_length unless the run needs more: a max_length under the sliding window is
        # refused by GroupQueryAttention ("KV cache capacity (8) must be at least local_window_size (16)")
        if max_length > model.max_length:
            params.set_search_options(max_length=max_length)
        return og.Generator(model.og_model, params)

    def _unavailable(self, spec: GemmaSpec) -> dict[str, str]:
        return {f"layers.{i}.attn.{t}": FUSED for i in range(spec.num_layers) for t in ("scores", "probs")}

    def run(self, model: OrtModel, tokens: list[int], feed: dict[str, np.ndarray] | None = None) -> RunResult:
        if feed:
            raise RuntimeError(f"{self.name} runs the builder's whole graph through the generator: no sub-graph "
                               "takes a fed input, so isolated mode is not available; use --mode cumulative")
        gen = self._generator(model, len(tokens))
        gen.append_tokens(list(tokens))
        taps = {t: np.array(gen.get_output(v)[0]) for t, v in model.values.items()}
        taps["rope.cos"] = _rope_cos(model, len(tokens))
        return RunResult(taps, self._unavailable(model.spec))

    def decode(self, model: OrtModel, prompt: list[int], continuation: list[int]) -> DecodeResult:
        """Prefill, then one `append_tokens` per token; the global layers' `present` buffers hold position j at
        slot j (slots past the step: not written, position -1)."""
        spec = model.spec
        gen = self._generator(model, len(prompt) + len(continuation))
        gen.append_tokens(list(prompt))
        local = [i for i, t in enumerate(spec.layer_types) if t == "local" and spec.sliding_window]
        steps = []
        for s, token in enumerate(continuation):
            p = len(prompt) + s
            gen.append_tokens([int(token)])
            taps = {t: np.array(gen.get_output(v)[0]) for t, v in model.values.items()}
            cache = {}
            for i in range(spec.num_layers):
                if i in local:
                    continue
                k = np.array(gen.get_output(f"present.{i}.key")[0])  # [kv, S, hd]
                v = np.array(gen.get_output(f"present.{i}.value")[0])
                pos = np.arange(k.shape[1], dtype=np.int64)
                pos[pos > p] = -1
                cache[i] = CacheView(pos, k, v)
            steps.append(DecodeStep(taps=taps, cache=cache))
        unavailable = dict(self._unavailable(spec))
        unavailable.update({f"layers.{i}.cache.{x}": WINDOWED for i in local for x in ("k", "v")})
        return DecodeResult(steps, unavailable)

    def effective(self, model: OrtModel) -> dict:
        from parity.adapters.ort_genai.readback import effective

        out = effective(model)
        if model.loading:
            out["library"]["weights_loaded_by"] = model.loading
        return out

    def release(self, model: OrtModel) -> None:
        model.og_model = None
        shutil.rmtree(model.run_dir, ignore_errors=True)


def _rope_cos(model: OrtModel, T: int) -> np.ndarray:
    """Layer 0's cos table [T, head_dim]: the cache its GroupQueryAttention reads, halves repeated (not
    interleaved, as the operator's rotary_interleaved=0 applies it)."""
    from parity.adapters.ort_genai.readback import initializer, layer_attention

    name = layer_attention(model.graph, 0).input[7]
    cos = initializer(model, name)[:T]
    return np.concatenate([cos, cos], axis=-1)
