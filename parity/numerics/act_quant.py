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
    rounding: str = "half-away"  # "half-away": ggml's round(x / d); "half-even": MLAS's rint(x * (127 / max))


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
)}


def act_quant(name: str) -> ActQuant:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"activation quantization {name!r} is not known; use one of {', '.join(KINDS)}") from None


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
