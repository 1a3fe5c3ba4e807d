"""The weights an int8 / int4 model built by onnxruntime-genai computes with, read back from its own ONNX file.

What the 0.18 builder writes on CPU (`-p int8|int4 -e cpu`; its defaults: block_size 32, symmetric, method
"default", accuracy_level 4 on cpu/webgpu, onnxruntime-genai `models/quantization/quant_config.py`):

- every projection is a `MatMulNBits` (bits 8 or 4, block_size 32, accuracy_level 4): the fused qkv_proj
  (q, k, v rows stacked along N), o_proj, gate_proj, up_proj, down_proj, and lm_head; no zero-point input
  (symmetric: the operator's default zero point 2^(bits-1), 128 or 8, on unsigned codes);
- int4 with a tied head: the embedding is a `GatherBlockQuantized` (bits 4, block 32, quantize_axis 1) reading
  lm_head's own 4-bit codes and scales, so embedding and head stay tied and equally rounded;
- int8: the embedding stays a float32 `Gather` of `model.embed_tokens.weight` while lm_head is its own 8-bit
  copy, so the built model is untied: the held weights carry `lm_head.weight` and an untied spec;
- the norms stay float32, with Gemma's unit offset folded in (1 + w stored): held as stored - 1, so the port's
  1 + w is the stored value.

MatMulNBits' layout (onnxruntime contrib op): B uint8 [N, n_blocks, blob], blob = block * bits / 8 bytes, 4-bit
codes two per byte, element 2j in the low nibble; scales [N, n_blocks] (or flat); W[n, k] = (q - zp) * scale,
the last block padded past K. The dequantized W [N, K] is already HF's [out, in] layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from parity.adapters.held_tensors import HeldTensors
from parity.model.canonical import canonical_shapes
from parity.model.spec import GemmaSpec
from parity.model.weights import Weights


@dataclass(frozen=True)
class Quant:
    """How the built model's projections are quantized, read from its MatMulNBits nodes."""
    bits: int
    block_size: int
    accuracy_level: int
    zero_points: bool  # whether any node has an explicit zero-point input
    ops: tuple[str, ...]  # the module paths quantized (`/model/layers.0/attn/qkv_proj`, `/lm_head`, ...)
    embedding: str  # "GatherBlockQuantized (4 bits, block 32, lm_head's codes)" or "Gather (float32)"

    def weight_type(self) -> str:
        zp = "explicit zero points" if self.zero_points else f"symmetric, zero point {2 ** (self.bits - 1)}"
        return f"int{self.bits} (MatMulNBits, block {self.block_size}, {zp}, accuracy_level {self.accuracy_level})"

    def activations(self) -> str | None:
        """parity.numerics.act_quant's name for what MatMulNBits does to its float input.

        accuracy_level 4 (the builder's CPU default) selects MLAS's CompInt8 path: each row of A is quantized to
        int8 per block of the weight's block length, scale = max|a| / 127 in float32, codes rounded to nearest
        (onnxruntime `mlas/lib/sqnbitgemm_kernel_avx2.cpp` QuantizeARow_CompInt8_avx2, `_mm256_round_ps`), then
        integer dot products. Other levels compute in float32 from the dequantized weights.
        """
        if self.accuracy_level != 4:
            return None
        name = f"int8/{self.block_size}"
        from parity.numerics.act_quant import KINDS

        if name not in KINDS:
            raise ValueError(f"ort-genai: MatMulNBits quantizes activations per block of {self.block_size}, which "
                             f"parity.numerics.act_quant does not name (it has {', '.join(KINDS)}); add the kind")
        return name


def read_initializer(t, folder: Path) -> np.ndarray:
    """An initializer's array, its external data read by hand (onnx's loader refuses a data file with several
    hard links, which a run folder makes)."""
    import onnx
    from onnx import numpy_helper

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    with open(Path(folder) / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        raw = f.read(int(info["length"]))
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims)).copy()


def unpack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes [..., nbytes] -> codes [..., nbytes * 8 / bits] (4 bits: element 2j the low nibble)."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes
    if bits == 4:
        return np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)  # [..., 2 * nbytes]
    raise ValueError(f"ort-genai: MatMulNBits with {bits} bits; parity reads 4 and 8 (the builder's int4/int8)")


def dequantize(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block: int,
               n: int, k: int) -> np.ndarray:
    """MatMulNBits' weight as the operator defines it: float32 [N, K]."""
    n_blocks = -(-k // block)
    q = unpack(b.reshape(n, n_blocks, -1), bits).astype(np.float32)  # [N, n_blocks, block]
    if q.shape[-1] != block:
        raise ValueError(f"ort-genai: a {bits}-bit blob of {b.reshape(n, n_blocks, -1).shape[-1]} bytes holds "
                         f"{q.shape[-1]} codes, not block_size {block}")
    s = np.asarray(scales, np.float32).reshape(n, n_blocks, 1)
    if zero_points is None:
        zp = np.float32(2 ** (bits - 1))
    elif zero_points.dtype == np.uint8:
        zp = unpack(zero_points.reshape(n, -1), bits)[:, :n_blocks].astype(np.float32)[..., None]  # [N, nb, 1]
    else:
        raise ValueError(f"ort-genai: float zero points ({zero_points.dtype}) are not read here; the builder "
                         "writes uint8 ones (or none, symmetric)")
    q -= zp  # in place, the same float32 operations as (q - zp) * s: no two more [N, K] temporaries
    q *= s
    return q.reshape(n, n_blocks * block)[:, :k]  # [N, K]: the last block's padding dropped


class Graph:
    """The built model's graph and initializers, by name."""

    def __init__(self, folder: Path, filename: str = "model.onnx") -> None:
        import onnx

        self.folder = Path(folder)
        self.model = onnx.load(str(self.folder / filename), load_external_data=False)
        self.inits = {t.name: t for t in self.model.graph.initializer}
        self.nodes = list(self.model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}

    def array(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise RuntimeError(f"ort-genai: {name!r} is no initializer of {self.folder / 'model.onnx'}")
        return read_initializer(self.inits[name], self.folder)

    def source(self, value: str) -> np.ndarray:
        """An initializer, or one seen through the Reshape the builder puts before GatherBlockQuantized."""
        if value in self.inits:
            return self.array(value)
        n = self.producer.get(value)
        if n is not None and n.op_type == "Reshape":
            return self.source(n.input[0])
        raise RuntimeError(f"ort-genai: {value!r} is neither an initializer nor a reshaped one")

    def node(self, prefix: str, ops: tuple[str, ...]):
        hits = [n for n in self.nodes if n.name.startswith(prefix) and n.op_type in ops]
        if not hits:
            raise RuntimeError(f"ort-genai: no {'/'.join(ops)} node under {prefix!r} in {self.folder}; this "
                               "builder writes another graph: update adapters/ort_genai/held.py")
        return hits[0]


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def matmul_node(g: Graph, prefix: str) -> tuple[object, dict, tuple[int, int]]:
    """The MatMul(NBits) under `prefix`, the quantizing node's attributes ({} for a float MatMul; with
    "zero_points" and "name"), and its weight's [N, K] shape, read from the graph alone (nothing dequantized)."""
    n = g.node(prefix, ("MatMulNBits", "MatMul"))
    if n.op_type == "MatMul":
        k, n_out = g.inits[n.input[1]].dims if n.input[1] in g.inits else g.array(n.input[1]).shape
        return n, {}, (int(n_out), int(k))
    a = _attrs(n)
    zp = len(n.input) > 3 and bool(n.input[3])
    return n, {**a, "zero_points": zp, "name": prefix}, (int(a["N"]), int(a["K"]))


def matmul_rows(g: Graph, prefix: str):
    """rows -> those rows [n, K] float32 of the MatMul(NBits) under `prefix`'s weight, only they dequantized; its
    codes and scales (a fraction of the float32 size) read once, here."""
    n, a, (n_out, k) = matmul_node(g, prefix)
    if not a:
        w = g.array(n.input[1])  # [K, N]
        return lambda rows: np.ascontiguousarray(w.T[rows].astype(np.float32))
    zp = g.array(n.input[3]).reshape(n_out, -1) if a["zero_points"] else None
    b, scales = g.array(n.input[1]).reshape(n_out, -1), g.array(n.input[2]).reshape(n_out, -1)  # [N, blocks * blob]
    bits, block = int(a["bits"]), int(a["block_size"])
    return lambda rows: dequantize(b[rows], scales[rows], None if zp is None else zp[rows], bits, block,
                                   len(range(n_out)[rows]), k)


def matmul_weight(g: Graph, prefix: str, rows: slice = slice(None)) -> tuple[np.ndarray, dict]:
    """The [N, K] float32 weight of the MatMul(NBits) under `prefix` (only `rows` of it: only those dequantized),
    and the quantizing node's attributes ({} for a float MatMul, whose [K, N] initializer is transposed to [N, K])."""
    return matmul_rows(g, prefix)(rows), matmul_node(g, prefix)[1]


def _embedding_node(g: Graph) -> tuple[object, dict, tuple[int, int], str]:
    """The embedding's gather, its attributes ({} for a float Gather), the table's shape and what the gather is."""
    n = g.node("/model/embed_tokens/", ("GatherBlockQuantized", "Gather"))
    if n.op_type == "Gather":
        dims = g.inits[n.input[0]].dims if n.input[0] in g.inits else g.array(n.input[0]).shape
        return n, {}, (int(dims[0]), int(dims[1])), "Gather (float32)"
    a = _attrs(n)
    if int(a.get("quantize_axis", 1)) != 1 or int(a.get("gather_axis", 0)) != 0:
        raise RuntimeError(f"ort-genai: GatherBlockQuantized with {a}; parity reads gather_axis 0, quantize_axis 1")
    bits, block = int(a.get("bits", 4)), int(a["block_size"])
    scales = g.array(n.input[2])  # [rows, n_blocks] (or flat): small beside the codes
    rows = int(g.source(n.input[0]).shape[0]) if scales.ndim != 2 else scales.shape[0]
    shape = (rows, scales.reshape(rows, -1).shape[1] * block)
    shared = "lm_head's codes" if any("lm_head" in x for x in (n.input[2], *n.input)) else "its own codes"
    how = f"GatherBlockQuantized ({bits} bits, block {block}, {shared})"
    return n, {**a, "bits": bits, "block_size": block}, shape, how


def embedding_rows(g: Graph):
    """rows -> those rows of the embedding table as the graph's gather reads it; its codes read once, here."""
    n, a, (total, k), _ = _embedding_node(g)
    if not a:
        table = g.array(n.input[0])
        return lambda rows: table[rows].astype(np.float32)
    zp = g.array(n.input[3]).reshape(total, -1) if len(n.input) > 3 and n.input[3] else None
    data, scales = g.source(n.input[0]).reshape(total, -1), g.array(n.input[2]).reshape(total, -1)
    return lambda rows: dequantize(data[rows], scales[rows], None if zp is None else zp[rows], a["bits"],
                                   a["block_size"], len(range(total)[rows]), k)


def embedding(g: Graph, rows: slice = slice(None)) -> tuple[np.ndarray, str]:
    """The embedding table (only `rows` of it) as the graph's gather reads it, and what that gather is."""
    return embedding_rows(g)(rows), _embedding_node(g)[3]


def norm_weight(g: Graph, prefix: str) -> np.ndarray:
    """A norm's canonical weight: the stored one, minus Gemma's unit offset the builder folded in."""
    n = g.node(prefix, ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"))
    stored = g.array(n.input[2] if n.op_type.startswith("Skip") else n.input[1]).astype(np.float64)
    return (stored - 1.0).astype(np.float32)  # exact for stored in [0.5, 2] (Sterbenz)


_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
          "pre_feedforward_layernorm": "pre_feedforward_layernorm",
          "post_feedforward_layernorm": "post_feedforward_layernorm",
          "self_attn.q_norm": "attn/q_norm", "self_attn.k_norm": "attn/k_norm"}


def held_weights(spec: GemmaSpec, folder: Path, filename: str = "model.onnx") -> tuple[Weights, Quant]:
    """Every canonical tensor as the built model computes with it (float32, canonical names and layout),
    dequantized one at a time when read (parity.adapters.held_tensors.HeldTensors): a real-size model's
    dequantized weights are never all in memory. `filename`: the graph in `folder` to read (the builder's
    model.onnx; a run folder's edited copy)."""
    g = Graph(folder, filename)
    L, hd = spec.num_layers, spec.head_dim
    q_rows, kv_rows = spec.num_heads * hd, spec.num_kv_heads * hd
    load: dict = {}  # canonical name -> () -> its float32 array
    shapes: dict[str, tuple[int, ...]] = {}
    seen: list[dict] = []

    def mm(name: str, prefix: str, rows: slice = slice(None), n_rows: int | None = None) -> None:
        _, a, (n_out, k) = matmul_node(g, prefix)
        if a and rows.start in (None, 0):
            seen.append(a)  # once per node
        load[name] = lambda: matmul_weight(g, prefix, rows)[0]
        shapes[name] = (n_out if n_rows is None else n_rows, k)

    for i in range(L):
        p, m = f"model.layers.{i}.", f"/model/layers.{i}/"
        qkv = m + "attn/qkv_proj/"  # [q + 2 kv, H]: q, k, v rows in that order
        n_qkv = matmul_node(g, qkv)[2][0]
        if n_qkv != q_rows + 2 * kv_rows:
            raise RuntimeError(f"ort-genai: layer {i}'s qkv_proj has {n_qkv} rows, not q {q_rows} + "
                               f"k {kv_rows} + v {kv_rows}")
        mm(p + "self_attn.q_proj.weight", qkv, slice(0, q_rows), q_rows)
        mm(p + "self_attn.k_proj.weight", qkv, slice(q_rows, q_rows + kv_rows), kv_rows)
        mm(p + "self_attn.v_proj.weight", qkv, slice(q_rows + kv_rows, None), kv_rows)
        mm(p + "self_attn.o_proj.weight", m + "attn/o_proj/")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            mm(p + f"mlp.{proj}.weight", m + f"mlp/{proj}/")
    _, _, embed_shape, how = _embedding_node(g)
    load["model.embed_tokens.weight"] = lambda: embedding(g)[0]
    shapes["model.embed_tokens.weight"] = embed_shape
    mm("lm_head.weight", "/lm_head/")
    tied = spec.tied_head and embed_shape == shapes["lm_head.weight"] and _equal_rows(
        embedding_rows(g), matmul_rows(g, "/lm_head/"), embed_shape[0])
    if tied:
        del load["lm_head.weight"], shapes["lm_head.weight"]
    held_spec = replace(spec, tied_head=tied)
    for name in canonical_shapes(held_spec):
        if name.endswith("norm.weight") and name not in load:
            if name == "model.norm.weight":
                prefix = f"/model/layers.{L}/final_norm_layernorm/"
            else:
                i, rest = name[len("model.layers."):].split(".", 1)
                prefix = f"/model/layers.{i}/{_NORMS[rest[:-len('.weight')]]}/"
            load[name] = lambda prefix=prefix: norm_weight(g, prefix)
            shapes[name] = load[name]().shape  # a vector: read now, its shape checked with the others
    want = canonical_shapes(held_spec)
    if set(shapes) != set(want) or any(tuple(shapes[k]) != tuple(want[k]) for k in want):
        bad = sorted(set(shapes) ^ set(want)) or [k for k in want if tuple(shapes[k]) != tuple(want[k])]
        raise RuntimeError(f"ort-genai: the held weights do not match the spec's canonical tensors: {bad[:4]}")
    kinds = {(int(a["bits"]), int(a["block_size"]), int(a.get("accuracy_level", 0))) for a in seen}
    if len(kinds) != 1:
        raise RuntimeError(f"ort-genai: the built model mixes MatMulNBits settings {sorted(kinds)}; parity holds "
                           "one (bits, block_size, accuracy_level) per model")
    (bits, block, level), = kinds
    quant = Quant(bits, block, level, any(a["zero_points"] for a in seen), tuple(a["name"].rstrip("/") for a in seen),
                  how)
    tensors = HeldTensors(lambda name: load[name](), list(want))
    return Weights(held_spec, tensors, source=f"dequantized from {Path(folder) / filename}"), quant


def _equal_rows(a, b, rows: int, chunk: int = 4096) -> bool:
    """Whether two [rows, K] tables are equal, compared `chunk` rows at a time (one chunk of each in memory)."""
    return all(np.array_equal(a(slice(i, i + chunk)), b(slice(i, i + chunk))) for i in range(0, rows, chunk))
