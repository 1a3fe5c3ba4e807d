"""How a runtime rounds the activations its matmuls read: the names adapters declare, and what each means.

A quantized runtime does not multiply float activations by its weights: ggml's CPU matmul first converts the
activation row to the weight type's `vec_dot_type` (f16 for f16 weights, bf16 for bf16, q8_0 blocks of 32 for
q8_0/q4_0/q4_1/q5_x, q8_K blocks of 256 for the K-quants), and onnxruntime's MatMulNBits at accuracy level 4
quantizes them to int8 per block of the weight's block size. That rounding is honest (the runtime is meant to
do it), so the honest-noise model's members do it too (parity.adapters.port_model.Linear, `act_quant`), and a
run's error is judged against what such a correct kernel errs.

Each kind: (block length along the input dimension or 0 for a plain float cast, the float format the block
scale is stored in, or the float dtype the row is cast to, and how a code is rounded). The rounding matters:
a value whose x / d lands on a half (frequent with bf16-like activations) goes to 41 in ggml (roundf, half away
from zero) and to 40 in onnxruntime's MLAS (`_mm256_round_ps` to nearest even, from x * (127 / max),
QuantizeARow_CompInt8_avx2 in mlas/lib/sqnbitgemm_kernel_avx2.cpp); one code off moves a projection by d * |w|,
far above float32 noise (measured on ort-genai int4: 2e-3 at layers.0.attn against 3e-7 with ties to even).

KV-cache kinds (PortOptions.kv_round, Held.kv) round the keys and values as a quantized cache stores them, and
name what the query is converted to before the product with the keys (`query`): ggml's q4_0/q5_0 caches
(quantize_row_q4_0_ref: d = max / -8 from the block's largest-magnitude value, q = min(15, (int8)(x * (1 / d) +
8.5f)), a truncation of x / d + 8.5 in float32, not a rounding of x / d; the query goes to q8_0, the K type's
vec_dot type), and mlx's affine groups (mx.quantize, as mlx-lm's QuantizedKVCache stores K and V: per group a
scale (max - min) / (2^bits - 1) and a bias, both nudged so the group's larger-magnitude edge is exact, codes
rint((x - bias) / scale); dequantized (q * scale) + bias, each rounded to the cache's dtype; the query and the
probabilities stay float, mx.quantized_matmul dequantizes). Measured against both runtimes (tests/test_kv_quant.py):
bit-exact stored values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ActQuant:
    name: str
    block: int  # elements per scale along the matmul's input dimension; 0: a plain cast, no integer blocks
    fmt: str  # the cast's dtype (block 0), or the dtype each block's scale is stored in
    what: str  # one line for the report
    rounding: str = "half-away"  # "half-away": ggml's round(x / d); "half-even": MLAS's rint(x * (127 / max));
    # "trunc": ggml's q4_0/q5_0 (int8)(x / d + 2^(bits-1) + 0.5); "affine": mx.quantize's scale and bias per group
    bits: int = 8
    query: str = "same"  # a KV-cache kind: what the query is rounded to before q.k ("same", "none" or a kind)


KINDS = {k.name: k for k in (
    ActQuant("f16", 0, "float16", "activations cast to float16 before each matmul (ggml vec_dot_type of f16)"),
    ActQuant("bf16", 0, "bfloat16", "activations cast to bfloat16 before each matmul (ggml vec_dot_type of bf16)"),
    ActQuant("q8_0", 32, "float16", "activations quantized to int8 in blocks of 32, float16 scales (ggml q8_0)"),
    # ggml-cpu's x86 SIMD quantize_row_q8_0 (arch/x86/quants.c, and the repacked ggml_quantize_mat_q8_0_4x8):
    # x * (127 / max) rounded half to even (_mm256_round_ps), not the generic C's round(x / d); measured: one
    # activation of tiny-gemma2 lands on -42.5 vs -42.500004 and llama.cpp's Q8_0 projections follow this kind
    ActQuant("q8_0-x86", 32, "float16", "activations quantized to int8 in blocks of 32, float16 scales, rounded "
             "half to even (ggml q8_0, x86 SIMD)", "half-even"),
    # quantize_row_q8_K_ref (every platform): nearest_int(-127 / max * x), which rounds half to even
    ActQuant("q8_K", 256, "float32", "activations quantized to int8 in blocks of 256, float32 scales, rounded "
             "half to even (ggml q8_K)", "half-even"),
    ActQuant("int8/32", 32, "float32", "activations quantized to int8 in blocks of 32, float32 scales, "
             "rounded half to even (onnxruntime MatMulNBits, accuracy level 4)", "half-even"),
    ActQuant("int8/128", 128, "float32", "activations quantized to int8 in blocks of 128, float32 scales, "
             "rounded half to even (onnxruntime MatMulNBits, accuracy level 4)", "half-even"),
    # KV-cache kinds of llama.cpp (flash attention): K and V stored by quantize_row_q{4,5}_0_ref (every platform),
    # the query converted to q8_0 (vec_dot_type of Q4_0 and Q5_0), by the SIMD path on x86 (see q8_0-x86)
    ActQuant("q4_0", 32, "float16", "KV cache in 4-bit blocks of 32, float16 scales (ggml q4_0); the query to "
             "q8_0", "trunc", 4, "q8_0"),
    ActQuant("q4_0-x86", 32, "float16", "KV cache in 4-bit blocks of 32, float16 scales (ggml q4_0); the query "
             "to q8_0, rounded half to even (x86 SIMD)", "trunc", 4, "q8_0-x86"),
    ActQuant("q5_0", 32, "float16", "KV cache in 5-bit blocks of 32, float16 scales (ggml q5_0); the query to "
             "q8_0", "trunc", 5, "q8_0"),
    ActQuant("q5_0-x86", 32, "float16", "KV cache in 5-bit blocks of 32, float16 scales (ggml q5_0); the query "
             "to q8_0, rounded half to even (x86 SIMD)", "trunc", 5, "q8_0-x86"),
)}
AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize accepts
AFFINE_GROUPS = (32, 64, 128)
_FMT = {"": "float32", "f32": "float32", "f16": "float16", "bf16": "bfloat16"}
_SHORT = {"float32": "", "float16": "-f16", "bfloat16": "-bf16"}


def affine_kind(bits: int, group: int, dtype: str = "float32") -> str:
    """The kind name of mlx's affine quantization (mx.quantize) with scales and biases in `dtype`."""
    return f"affine{bits}/{group}{_SHORT[dtype]}"


def _affine(name: str) -> ActQuant | None:
    import re

    m = re.fullmatch(r"affine(\d+)/(\d+)(?:-(f32|f16|bf16))?", name)
    if not m or int(m[1]) not in AFFINE_BITS or int(m[2]) not in AFFINE_GROUPS:
        return None
    bits, group, fmt = int(m[1]), int(m[2]), _FMT[m[3] or ""]
    return ActQuant(name, group, fmt, f"KV cache quantized affine, {bits} bits per value in groups of {group}, "
                    f"{fmt} scales and biases (mx.quantize, mlx-lm QuantizedKVCache); query and probabilities "
                    "float", "affine", bits, "none")


def act_quant(name: str) -> ActQuant:
    try:
        return KINDS[name]
    except KeyError:
        k = _affine(name)
        if k is None:
            raise ValueError(f"activation quantization {name!r} is not known; use one of {', '.join(KINDS)}, or "
                             f"affine<bits>/<group>[-f16|-bf16] with bits in {AFFINE_BITS} and group in "
                             f"{AFFINE_GROUPS}") from None
        return k


def query_kind(kv: str) -> str | None:
    """What the query is rounded to before its product with keys a `kv` cache holds (None: kept float)."""
    q = act_quant(kv).query
    return kv if q == "same" else None if q == "none" else q


def round_rows(x: np.ndarray, kind: str) -> np.ndarray:
    """`x` as a matmul of that kind reads it, in float32 (its last axis is the matmul's input dimension).

    Integer kinds follow ggml's quantize_row_q8_0: per block of B along the last axis, d = max|x| / 127,
    q = round-half-away(x / d) (at most 127), value = q * d with d stored in the kind's scale format; the
    "half-even" kinds (onnxruntime's MLAS) q = rint(x * (127 / max)), all in float32. A last block shorter than
    B (a width B does not divide) is a block of its own.
    """
    import ml_dtypes  # noqa: F401 -- registers bfloat16 with numpy

    k = act_quant(kind)
    x = np.asarray(x, np.float32)
    if k.block == 0:
        return x.astype(k.fmt).astype(np.float32)
    out = np.empty_like(x)
    for lo in range(0, x.shape[-1], k.block):
        xb = x[..., lo:lo + k.block]  # [..., b]
        if k.rounding == "trunc":
            out[..., lo:lo + k.block] = _ggml_trunc(xb, k)
            continue
        if k.rounding == "affine":
            out[..., lo:lo + k.block] = _mx_affine(xb, k)
            continue
        amax = np.abs(xb).max(axis=-1, keepdims=True)  # [..., 1]
        d = amax / np.float32(127)
        if k.rounding == "half-even":
            inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
            q = np.clip(np.rint(xb * inv), -127, 127)
        else:
            v = np.divide(xb, d, out=np.zeros_like(xb), where=d > 0)
            q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127)
        out[..., lo:lo + k.block] = q * d.astype(k.fmt).astype(np.float32)
    return out


def _ggml_trunc(xb: np.ndarray, k: ActQuant) -> np.ndarray:
    """quantize_row_q4_0_ref / q5_0_ref then dequantize, in float32: d = max / -2^(bits-1) with max the block's
    largest-magnitude value (the first of equal ones, as its strict `<` keeps), q = min(2^bits - 1,
    trunc(x * (1 / d) + (2^(bits-1) + 0.5))), value (q - 2^(bits-1)) * float16(d)."""
    half = np.float32(2 ** (k.bits - 1))
    first = np.argmax(np.abs(xb), axis=-1)[..., None]  # [..., 1]
    mx = np.take_along_axis(xb, first, axis=-1)  # [..., 1]: signed
    d = mx / -half
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(np.trunc(xb * inv + (half + np.float32(0.5))), np.float32(2 ** k.bits - 1))
    return (q - half) * d.astype(k.fmt).astype(np.float32)


def _mx_affine(xb: np.ndarray, k: ActQuant) -> np.ndarray:
    """mx.quantize then mx.dequantize (mlx/ops.cpp affine_quantize, measured bit-exact): scale = max((max - min) /
    (2^bits - 1), 1e-7), its sign and the bias from the larger-magnitude edge, scale re-derived so that edge is a
    whole code, codes rint((x - bias) / scale) clipped; value (q * scale) + bias, each rounded to the scale dtype.
    The input is the cache's dtype already (`xb` holds such values in float32)."""
    import ml_dtypes  # noqa: F401 -- registers bfloat16 with numpy

    top = np.float32(2 ** k.bits - 1)
    hi, lo = xb.max(axis=-1, keepdims=True), xb.min(axis=-1, keepdims=True)  # [..., 1]
    scale = np.maximum((hi - lo) / top, np.float32(1e-7))
    low_edge = np.abs(lo) > np.abs(hi)
    scale = np.where(low_edge, scale, -scale)
    edge = np.where(low_edge, lo, hi)
    q0 = np.rint(edge / scale)
    scale = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scale).astype(np.float32)
    bias = np.where(q0 == 0, np.float32(0), edge).astype(np.float32)
    q = np.clip(np.rint((xb - bias) / scale), 0, top)
    f = np.dtype(k.fmt)
    s, b = scale.astype(f), bias.astype(f)
    return ((q.astype(f) * s).astype(f) + b).astype(f).astype(np.float32)
