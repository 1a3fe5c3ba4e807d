"""`LlamaCppAdapter`: Gemma 1/2/3 run by llama.cpp (through llama-cpp-python's low-level API) from a GGUF
parity writes from the canonical weights (gguf_file.py).

build: the GGUF (cached), `llama_model_load_from_file` (CPU only). run: a fresh context per run with the
`cb_eval` callback (capture.py), one `llama_batch` of every token with every row's logits requested, one
`llama_decode`; each tap is the graph node llama.cpp names for it (TAPS below, src/models/gemma{,2,3}.cpp and
src/llama-graph.cpp of the vendored llama.cpp), copied the moment it is computed. decode: the same context,
prefill in one batch, then one `llama_decode` per token through llama.cpp's own KV cache (the iSWA caches on
Gemma 2/3), the cache tensors read after each step.

Every setting that changes llama.cpp's numbers is set explicitly in llama_context_params, never left to its
defaults: KV-cache type (type_k = type_v), flash attention (flash_attn_type 0/1, never AUTO), threads.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from parity.adapters.base import Adapter, CacheView, DecodeResult, DecodeStep, Held, RunResult
from parity.adapters.llama_cpp import gemma4, gguf_file
from parity.adapters.llama_cpp.capture import GgmlTensor, Recorder, quiet, read
from parity.adapters.llama_cpp.readback import query_scale as _query_scale_llama
from parity.adapters.registry import require_importable
from parity.errors import ParityInputError, Unsupported
from parity.model.spec import GemmaSpec
from parity.model.taps import order_experts
from parity.model.weights import Weights

KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q5_0": 6}  # ggml_type
# the cache types whose rounding of attention's operands the honest members model (Held.kv, a
# parity.numerics.act_quant kind, this machine's for the query's q8_0): an F16 cache stores K and V in f16, and
# ggml's mul_mat converts q (for K) and the probabilities (for the transposed V) to f16, its vec_dot type; a
# q8_0/q4_0/q5_0 cache (flash attention only, as llama.cpp requires) stores its blocks of 32 along head_dim
# (ggml-cpu's set_rows: quantize_row_q8_0 (SIMD on x86), quantize_row_q{4,5}_0_ref) and ggml_compute_forward_
# flash_attn_ext_f16 converts q to the K type's vec_dot type (q8_0 for all three), dequantizing V to float32 with
# the probabilities kept float32. Measured: the cache llama.cpp holds is the kind's rounding bit for bit
# (tests/test_kv_quant.py). q4_1/q5_1 are not offered: their q8_1 query's block sum, which multiplies each key
# block's min, is rounded to f16 in the product itself (measured: 4.4x / 1.4x at layers.0.attn even declared).
KV_ROUNDING = ("f16", "bf16", "q8_0", "q4_0", "q5_0")
FLASH = {"off": 0, "on": 1}  # llama_flash_attn_type (AUTO = -1 is never used: the path must be known)
GEGLU = ("llama.cpp's build_ffn(LLM_FFN_GELU, LLM_FFN_PAR) emits one fused ggml_geglu_split node: gelu(gate) "
         "is never a tensor of its own")
ROPE = "ggml_rope_ext computes the rotation inside the ROPE op: no cos table exists as a tensor"
FLASH_FUSED = ("flash attention is on: attention is one FLASH_ATTN_EXT node, the scores and probabilities never "
               "exist as tensors (flash_attn='off' exposes them)")

# canonical tap (layer i) -> llama.cpp node name; "@wo" is the attention output projection's MUL_MAT (unnamed)
LAYER_TAPS = {
    "attn_norm": "attn_norm-{i}", "attn": "@wo-{i}", "attn_residual": "sa_out-{i}", "mlp_norm": "ffn_norm-{i}",
    "mlp.gate": "ffn_gate-{i}", "mlp.up": "ffn_up-{i}", "mlp.hidden": "ffn_geglu-{i}", "mlp": "ffn_out-{i}",
    "out": "l_out-{i}",
}
SANDWICH_TAPS = {"post_attn_norm": "attn_post_norm-{i}", "post_mlp_norm": "ffn_post_norm-{i}"}
SCORES = {1: "kq-{i}", 2: "kq_scaled_2-{i}", 3: "kq-{i}"}  # Gemma 2: after the softcap; 1/3: q pre-scaled
WANT = {"inp_scaled", "result_norm", "result_output", "ffn_post_norm", "kq_soft_max",
        *(v.split("-")[0] for v in (*LAYER_TAPS.values(), *SANDWICH_TAPS.values(), *SCORES.values()))}


@dataclass
class Built:
    spec: GemmaSpec
    path: Path
    model: Any  # llama_model_p
    weight_type: str
    norm0: np.ndarray  # layer 0's first norm as given, to read the unit offset back
    contexts: list = field(default_factory=list)
    loading: str = ""  # which program wrote the GGUF loaded, and why (convert.py): effective()'s weights_loaded_by


class LlamaCppAdapter(Adapter):
    name = "llama-cpp"
    decodes = True
    cannot = {"rope.cos": ROPE}

    def __init__(self, weights: str = "f32", kv_type: str = "f16", flash_attn: str = "off",
                 edit: Callable[[dict], None] | None = None) -> None:
        if weights not in gguf_file.WEIGHT_TYPES:
            raise ParityInputError(f"llama-cpp weights={weights!r}; use one of {', '.join(gguf_file.WEIGHT_TYPES)}")
        if kv_type not in KV_TYPES:
            raise ParityInputError(f"llama-cpp kv_type={kv_type!r}; use one of {', '.join(KV_TYPES)}")
        if flash_attn not in FLASH:
            raise ParityInputError(f"llama-cpp flash_attn={flash_attn!r}; use one of {', '.join(FLASH)}")
        self.weights, self.kv_type, self.flash_attn = weights, kv_type, flash_attn
        self.edit = edit  # applied to the GGUF metadata before it is written (fault injection in tests)
        self._sources: dict[str, tuple[Path, str]] = {}  # weights hash -> (the GGUF, who wrote it and why)
        if weights != "f32":
            self.name = f"llama-cpp-{weights}"

    def version(self) -> str:
        from importlib.metadata import version

        return f"llama-cpp-python {version('llama-cpp-python')} / gguf {version('gguf')} (CPU)"

    def settings(self) -> dict[str, str]:
        return {"weights": self.weights, "kv_cache": self.kv_type, "flash_attn": self.flash_attn,
                "threads": str(_threads())}

    # ------------------------------------------------------------ check
    def check(self, spec: GemmaSpec, dtype: str) -> None:
        require_importable(self.name, "llama_cpp", "gguf")
        if dtype != "float32":
            raise Unsupported(f"{self.name} computes float32 activations on CPU (ggml-cpu), not {dtype} (the "
                              "weight type is an option: weights=); use --dtypes float32 for it")
        fixed, graph = (gemma4.FIXED, "gemma4.cpp") if spec.family == 4 else (
            {"embed_scale": True, "norm_placement": "pre" if spec.family == 1 else "sandwich",
             "qk_norm": spec.family == 3, "gelu_approximate": "tanh", "tied_head": True}, "graph")
        for f, want in fixed.items():
            if getattr(spec, f) != want:
                raise Unsupported(f"{self.name} cannot build {f}={getattr(spec, f)!r} for Gemma {spec.family} "
                                  f"(llama.cpp's {graph} hard-codes {want!r}); drop it from --impls for this spec")
        if spec.embed_scale_dtype == "bfloat16":
            raise Unsupported(f"{self.name}: llama.cpp scales the embeddings by sqrtf(n_embd) in float32, not a "
                              "bfloat16 constant; drop it from --impls for this spec")
        if spec.family == 4:
            gemma4.check(spec, self.name)  # src/models/gemma4.cpp: its other limits
        else:
            self._check_gemma123(spec)
        self._check_options(spec)

    def _check_gemma123(self, spec: GemmaSpec) -> None:
        want = 1.0 / math.sqrt(spec.query_pre_attn_scalar or spec.head_dim)
        got = _query_scale_llama(spec)
        if abs(got - want) > 1e-6 * want:
            raise Unsupported(f"{self.name}: llama.cpp has no query-scale key; it derives {got:.6g} from the layer "
                              f"count and head_dim, the spec asks {want:.6g}; drop it from --impls for this spec")
        caps = {1: (False, False), 2: (True, True), 3: (False, None)}[spec.family]  # must be set / unset / either
        for f, need in zip(("attn_softcap", "final_softcap"), caps):
            if need is not None and (getattr(spec, f) is not None) != need:
                raise Unsupported(f"{self.name}: Gemma {spec.family} in llama.cpp {'always' if need else 'never'} "
                                  f"applies {f} (spec: {getattr(spec, f)}); drop it from --impls for this spec")
        if spec.family == 1 and (spec.sliding_window or spec.rope_scaling_factor != 1.0):
            raise Unsupported(f"{self.name}: llama.cpp's Gemma 1 has no sliding window or RoPE scaling; drop it")
        if spec.family == 2 and spec.rope_scaling_factor != 1.0:
            raise Unsupported(f"{self.name}: llama.cpp's Gemma 2 reads no RoPE scaling for it; drop it")

    def _check_options(self, spec: GemmaSpec) -> None:
        if self.weights in gguf_file.K_QUANTS:
            widths = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
                      "num_heads * head_dim": spec.num_heads * spec.head_dim}
            for what, n in widths.items():
                if n % gguf_file.K_BLOCK:
                    raise ParityInputError(
                        f"{self.name}: {what} = {n} is not a multiple of {gguf_file.K_BLOCK}, the K-quant block "
                        f"(llama.cpp would fall back to another type); use a spec whose widths are multiples of "
                        f"{gguf_file.K_BLOCK}, or weights q4_0")
        if self.kv_type not in ("f32", "f16") and self.flash_attn != "on":
            raise ParityInputError(f"{self.name}: kv_type={self.kv_type} needs flash_attn='on' (llama.cpp cannot "
                                   "transpose a quantized or bf16 V cache); set flash_attn='on' or kv_type f16/f32")

    # ------------------------------------------------------------ build
    def _file(self, spec: GemmaSpec, weights: Weights) -> Path:
        return self._source(spec, weights)[0]

    def _source(self, spec: GemmaSpec, weights: Weights) -> tuple[Path, str]:
        """(the GGUF `build` loads and `held` reads, who wrote it): a whole checkpoint directory through
        llama.cpp's own converter where it can take it (convert.py), else parity's writer, with the reason."""
        key = weights.hash
        if key not in self._sources:
            if weights.checkpoint is not None and self.edit is None:
                from parity.adapters.llama_cpp import convert

                got = convert.converted(weights, self.weights)
                if got.path is not None:
                    self._sources[key] = (got.path, got.loaded_by)
                    return self._sources[key]
                how = got.loaded_by
            else:  # generated weights say nothing (as before); a checkpoint with a test's edit says so
                how = "" if weights.checkpoint is None else "parity's GGUF writer (gguf_file.py): a test's metadata edit"
            self._sources[key] = (gguf_file.cached(spec, weights, self.weights, self.edit), how)
        return self._sources[key]

    def held(self, spec: GemmaSpec, weights: Weights, dtype: str) -> Held | None:
        kv = _kv_kind(self.kv_type) if self.kv_type in KV_ROUNDING else None
        path, loading = self._source(spec, weights)
        if self.weights == "f32" and not _converted(loading):
            # the weights as given; what the cache and its products round is the honest members' to do too
            return Held(weights, "f32", None, kv) if kv else None
        tensors, _ = gguf_file.read_back(spec, path)
        held = Weights(spec, tensors, source=f"{self.name} GGUF")
        if self.weights == "f32" and all(np.array_equal(tensors[k], _read(weights, k)) for k in tensors):
            # the converter's F32 file holds the given numbers bit for bit: the ordinary reference judges it
            return Held(weights, "f32", None, kv) if kv else None
        # every matrix of a file is one type here (Q4_K is written `pure`; convert.py refuses a mixed file), so
        # one activation rounding applies; norms are F32 and take no matmul
        return Held(held, self.weights, gguf_file.activations(self.weights), kv)

    def build(self, spec: GemmaSpec, weights: Weights, dtype: str) -> Built:
        import llama_cpp

        quiet()
        path, loading = self._source(spec, weights)
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise RuntimeError(f"llama-cpp: llama_model_load_from_file refused {path}")
        norm0 = np.empty(weights.shape("model.layers.0.input_layernorm.weight"), np.float32)
        weights.read_into("model.layers.0.input_layernorm.weight", norm0)
        return Built(spec, path, model, self.weights, norm0, loading=loading)

    def _context(self, built: Built, n_ctx: int, rec: Recorder):
        import llama_cpp

        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_ctx  # the whole prompt in one ubatch: one graph, one callback pass
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = _threads()
        cp.type_k = cp.type_v = KV_TYPES[self.kv_type]
        cp.flash_attn_type = FLASH[self.flash_attn]
        cp.swa_full = False  # llama.cpp's default, explicit: the SWA cache is window + ubatch cells
        cb = rec.callback()
        cp.cb_eval = cb
        cp.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(built.model, cp)
        if not ctx:
            raise RuntimeError("llama-cpp: llama_init_from_model returned NULL")
        built.contexts.append((ctx, cb))  # the callback object must outlive the context
        return ctx

    # ------------------------------------------------------------ capture
    def _recorder(self, spec: GemmaSpec) -> Recorder:
        # unnamed matmuls, known by their weight: the attention output projection (and Gemma 4's MoE-layer dense
        # down projection, which gemma4.cpp leaves unnamed)
        wo = {f"blk.{i}.attn_output.weight": f"@wo-{i}" for i in range(spec.num_layers)}
        if spec.family == 4 and spec.num_experts:
            wo.update({f"blk.{i}.ffn_down.weight": gemma4.DENSE_DOWN.format(i=i) for i in range(spec.num_layers)})

        def wo_layer(t: GgmlTensor) -> str | None:
            if t.src[0]:
                return wo.get(t.src[0].contents.name.decode(errors="replace"))
            return None

        wanted = gemma4.WANT if spec.family == 4 else WANT

        def pre_scalar(t: GgmlTensor) -> int | None:  # Gemma 4: the add the layer scalar multiplies
            if spec.family != 4:
                return None
            return gemma4.pre_scalar_layer(spec, [t.src[k].contents.name.decode(errors="replace") if t.src[k]
                                                  else "" for k in range(2)])

        def want(name: str, t: GgmlTensor) -> bool:
            if name.startswith("cache_") and t.view_src:  # the KV cache tensors, read after the step
                base = t.view_src.contents
                rec.extra.setdefault("cache", {})[base.name.decode()] = ctypes.addressof(base)
                return False
            return name.split("-")[0] in wanted or wo_layer(t) is not None or pre_scalar(t) is not None

        def keep(r: Recorder, name: str, t: GgmlTensor) -> None:
            key = wo_layer(t)
            if key is not None:
                r.add(key, read(t))
                return
            i = pre_scalar(t)
            if i is not None:
                r.add(gemma4.PRE_SCALAR.format(i=i), read(t))
                return
            if name.split("-")[0] not in wanted:
                return
            if name.startswith("kq_soft_max"):  # the mask and scale soft_max_ext applies to the scores
                r.add("mask-" + name.split("-")[1], read(t.src[1].contents))
                r.add("kq_scale-" + name.split("-")[1], np.array(
                    ctypes.c_float.from_buffer_copy(bytes(t.op_params)[:4]).value, np.float32))
            r.add(name, read(t))

        rec = Recorder(want, keep)
        return rec

    def _taps(self, spec: GemmaSpec, rec: Recorder, T: int, L: int) -> tuple[dict, dict]:
        """Canonical taps from one llama_decode's recorded nodes; T query rows, L key slots (0..L-1)."""
        if rec.error is not None:
            raise rec.error
        nodes = rec.nodes

        def last(name: str) -> np.ndarray:
            if name not in nodes:
                raise RuntimeError(f"llama-cpp: graph node {name!r} was not computed; the vendored graph changed, "
                                   "update parity/adapters/llama_cpp/adapter.py LAYER_TAPS")
            return nodes[name][-1]

        taps = {"embed": last("inp_scaled").reshape(T, -1)}
        unavailable = {}
        for i in range(spec.num_layers):
            table = dict(LAYER_TAPS)
            if spec.family != 1:
                table.update(SANDWICH_TAPS)
            if spec.family == 4:
                table = gemma4.layer_taps(spec, i)
                if spec.ple_dim:  # [1, T, L, P] (ggml [P, L, T]) -> layer i's [T, P]
                    taps[f"layers.{i}.per_layer_input"] = last(gemma4.PER_LAYER_INPUT)[0][:, i, :]
            for tap, node in table.items():
                if spec.family == 2 and tap == "post_mlp_norm":
                    # gemma2.cpp names it with no layer suffix (cb(cur, "ffn_post_norm", -1)): the i-th one
                    taps[f"layers.{i}.{tap}"] = nodes["ffn_post_norm"][i].reshape(T, -1)
                    continue
                taps[f"layers.{i}.{tap}"] = last(node.format(i=i)).reshape(T, -1)
            unavailable[f"layers.{i}.mlp.act"] = GEGLU
            if self.flash_attn == "on":
                unavailable[f"layers.{i}.attn.scores"] = unavailable[f"layers.{i}.attn.probs"] = FLASH_FUSED
                continue
            kq = last((gemma4.SCORES if spec.family == 4 else SCORES[spec.family]).format(i=i))[0][:, :, :L]  # [heads, T, n_kv] -> its first L slots
            mask = last(f"mask-{i}")[0, 0, :T, :L]  # [T padded, n_kv] -> [T, L]: 0 or -inf
            scale = float(last(f"kq_scale-{i}"))
            taps[f"layers.{i}.attn.scores"] = (kq * np.float32(scale) + mask[None]).astype(np.float32)
            taps[f"layers.{i}.attn.probs"] = last(f"kq_soft_max-{i}")[0][:, :, :L]
        taps["final_norm"] = last("result_norm").reshape(T, -1)
        taps["logits"] = last("result_output").reshape(T, -1)
        if spec.family == 4:  # ggml's top-k order is its own
            order_experts(taps, spec.num_layers)
        return taps, unavailable

    def _decode(self, ctx, tokens: list[int], pos0: int) -> None:
        import llama_cpp

        T = len(tokens)
        batch = llama_cpp.llama_batch_init(T, 0, 1)
        try:
            batch.n_tokens = T
            for j, tok in enumerate(tokens):
                batch.token[j] = int(tok)
                batch.pos[j] = pos0 + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = 1  # every row's output: no row is dropped before the last layer
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama-cpp: llama_decode returned {rc} for {T} tokens at position {pos0}")
        finally:
            llama_cpp.llama_batch_free(batch)

    def run(self, model: Built, tokens: list[int], feed: dict[str, np.ndarray] | None = None) -> RunResult:
        if feed:
            raise RuntimeError(f"{self.name}: llama.cpp computes its whole graph in one llama_decode; substituting "
                               "a node's input from the eval callback is not implemented, so isolated mode is not "
                               "available; use --mode cumulative")
        rec = self._recorder(model.spec)
        ctx = self._context(model, _n_ctx(len(tokens)), rec)
        try:
            self._decode(ctx, list(tokens), 0)
            taps, unavailable = self._taps(model.spec, rec, len(tokens), len(tokens))
        finally:
            self._free(model, ctx)
        return RunResult(taps, unavailable)

    def decode(self, model: Built, prompt: list[int], continuation: list[int]) -> DecodeResult:
        """Prefill in one batch, then one llama_decode per token through llama.cpp's KV cache (cells are taken in
        order from a fresh cache that never fills here, so cell j holds position j; checked against the mask)."""
        spec = model.spec
        rec = self._recorder(spec)
        ctx = self._context(model, _n_ctx(len(prompt) + len(continuation)), rec)
        steps, unavailable = [], {}
        try:
            self._decode(ctx, list(prompt), 0)
            for s, token in enumerate(continuation):
                p = len(prompt) + s
                rec.clear()
                self._decode(ctx, [int(token)], p)
                taps, unavailable = self._taps(spec, rec, 1, p + 1)
                if self.flash_attn == "off":
                    _check_slots(spec, rec, p)
                steps.append(DecodeStep(taps=taps, cache=self._caches(model, rec, p)))
        finally:
            self._free(model, ctx)
        return DecodeResult(steps, unavailable)

    def _caches(self, built: Built, rec: Recorder, p: int) -> dict[int, CacheView]:
        spec = built.spec
        found = rec.extra.get("cache", {})
        out = {}
        for i in range(spec.num_layers):
            kv, hd = spec.kv_heads_for(i), spec.head_dim_for(i)  # Gemma 4 sizes local and global layers apart
            if spec.family == 4 and gemma4.kv_source(spec, i) != i:
                out[i] = out[gemma4.kv_source(spec, i)]  # a KV-shared layer has no cache: it reads its source's
                continue
            k_t = GgmlTensor.from_address(found[f"cache_k_l{i}"])
            v_t = GgmlTensor.from_address(found[f"cache_v_l{i}"])
            k = read(k_t).reshape(-1, kv * hd)[:p + 1]  # [cells, kv * hd] -> the first p + 1 cells
            v = read(v_t).reshape(-1)
            width = int(v_t.ne[0])  # kv * hd, or with v_trans the widest layer's (Gemma 4's local V is padded)
            if self.flash_attn == "off":  # llama.cpp stores V transposed without flash attention (v_trans)
                v = v.reshape(width, -1).T  # [cells, width]
            v = v.reshape(-1, width)[:p + 1, :kv * hd]
            pos = np.arange(p + 1, dtype=np.int64)
            out[i] = CacheView(pos, k.reshape(p + 1, kv, hd).transpose(1, 0, 2).copy(),
                               v.reshape(p + 1, kv, hd).transpose(1, 0, 2).copy())
        return out

    def _free(self, built: Built, ctx) -> None:
        import llama_cpp

        llama_cpp.llama_free(ctx)
        built.contexts = [(c, cb) for c, cb in built.contexts if c is not ctx]

    # ------------------------------------------------------------ readback
    def effective(self, model: Built) -> dict:
        from parity.adapters.llama_cpp.readback import effective

        out = effective(model, self.settings())
        if model.loading:
            out["library"]["weights_loaded_by"] = model.loading
        return out

    def release(self, model: Built) -> None:
        import llama_cpp

        for ctx, _ in model.contexts:
            llama_cpp.llama_free(ctx)
        model.contexts = []
        if model.model:
            llama_cpp.llama_model_free(model.model)
            model.model = None


def _converted(loading: str) -> bool:
    """Whether `_source` said the GGUF is llama.cpp's converter's (convert.py), not parity's writer's."""
    return loading.startswith("llama.cpp's")


def _read(weights: Weights, name: str) -> np.ndarray:
    out = np.empty(weights.shape(name), np.float32)
    weights.read_into(name, out)
    return out


def _threads() -> int:
    """PARITY_THREADS, as parity.adapters.torch_setup.threads() reads it (the harness has already refused a bad
    value through it); not imported from there, since that module imports torch and llama.cpp needs none."""
    text = os.environ.get("PARITY_THREADS", "1").strip()
    return int(text) if text.isdigit() and int(text) > 0 else 1


def _kv_kind(kv_type: str) -> str:
    """The act_quant kind of a cache type on this machine: x86's ggml-cpu quantizes q8_0 (the q8_0 cache, and
    the query read against q4_0/q5_0 keys) half to even (gguf_file.activations)."""
    q8 = gguf_file.activations("q8_0")
    if kv_type in ("q4_0", "q5_0"):
        return kv_type + ("-x86" if q8 == "q8_0-x86" else "")
    return gguf_file.activations(kv_type)


def _n_ctx(n: int) -> int:
    """Cells for n tokens, padded to 256 as llama.cpp pads its caches (the minimum 256 keeps the SWA cache, window
    + ubatch cells, from wrapping before n)."""
    return max(256, -(-n // 256) * 256)


def _check_slots(spec: GemmaSpec, rec: Recorder, p: int) -> None:
    """The step's mask shows cell j visible exactly when position j is (j <= p; within the window on a local
    layer): the cell-j-holds-position-j reading of the cache is what llama.cpp did."""
    for i in range(spec.num_layers):
        mask = rec.nodes[f"mask-{i}"][-1][0, 0, 0]  # [n_kv] for the step's one query
        window = spec.sliding_window if spec.layer_types and spec.layer_types[i] == "local" else None
        j = np.arange(mask.shape[0])
        want = (j <= p) & ((p - j < window) if window else True)
        if not np.array_equal(np.isfinite(mask), want):
            raise RuntimeError(f"llama-cpp: layer {i}'s cache cells are not positions 0..{p} in order at step "
                               f"position {p}; parity's cache reading (adapters/llama_cpp/adapter.py) needs updating")
