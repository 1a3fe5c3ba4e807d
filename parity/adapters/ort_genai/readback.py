"""The runtime's own view of the model, read back from what the builder wrote: genai_config.json, the graph's
operator attributes (GroupQueryAttention's scale, softcap, local_window_size; the norms' epsilon; the GELU's
approximation), its constants (the embedding multiplier, the final softcap's divisor) and initializers (the norm
weights as stored, the RoPE cos/sin caches). Nothing is copied from the spec: a value the builder changed,
rounded or dropped shows as a differing property.
"""

from __future__ import annotations

import json
import math

import numpy as np

from parity.model.effective import NOT_A_SETTING, report, rope_from_inv_freq


def layer_attention(graph, i: int):
    for n in graph.graph.node:
        if n.op_type == "GroupQueryAttention" and n.name.startswith(f"/model/layers.{i}/"):
            return n
    raise RuntimeError(f"ort-genai: layer {i} has no GroupQueryAttention node; update adapters/ort_genai/readback.py")


def attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def initializer(model, name: str) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    for t in model.graph.graph.initializer:
        if t.name != name:
            continue
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        # read by hand: onnx's loader refuses a data file with several hard links (the run folder links it)
        info = {e.key: e.value for e in t.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        with open(model.built / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            raw = f.read(int(info["length"]))
        return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims)).copy()
    raise RuntimeError(f"ort-genai: no initializer {name!r} in the builder's graph")


def constant(graph, value: str) -> float:
    """A scalar fed to an op: a Constant node's value or an initializer's."""
    from onnx import numpy_helper

    for n in graph.graph.node:
        if n.op_type == "Constant" and value in n.output:
            return float(numpy_helper.to_array(attrs(n)["value"]))
    for t in graph.graph.initializer:
        if t.name == value:
            return float(numpy_helper.to_array(t))
    raise RuntimeError(f"ort-genai: {value!r} is no constant")


def node(graph, name: str):
    return next((n for n in graph.graph.node if n.name == name), None)


def _inv_freq(model, cos_name: str) -> list[float]:
    """RoPE's frequencies from the caches the operator reads: position 1's angle, atan2(sin, cos)."""
    cos = initializer(model, cos_name)[1].astype(np.float64)
    sin = initializer(model, cos_name.replace("cos", "sin"))[1].astype(np.float64)
    return np.arctan2(sin, cos).tolist()


def effective(model) -> dict:
    g, spec = model.graph, model.spec
    cfg = json.loads((model.built / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    L = dec["num_hidden_layers"]
    gqa = [attrs(layer_attention(g, i)) for i in range(L)]
    norm = node(g, "/model/layers.0/input_layernorm/LayerNorm")
    stored = initializer(model, norm.input[1]).astype(np.float64)
    w = model.norm0.astype(np.float64)
    emb = node(g, "/model/embed_tokens/Mul")
    scale = constant(g, emb.input[1]) if emb is not None else 1.0
    act = next(n for n in g.graph.node if n.name.startswith("/model/layers.0/mlp/act_fn/"))
    approx = attrs(act).get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    div = node(g, "/lm_head/softcap/Div")
    gate = next(n.output[0] for n in g.graph.node if n.name.startswith("/model/layers.0/mlp/gate_proj/"))
    emb_src = [n for n in g.graph.node if n.name.startswith("/model/embed_tokens/") and n.op_type.startswith("Gather")]
    tied = bool(emb_src) and any("lm_head" in x or "Transpose" in x or "Reshape" in x for x in emb_src[0].input[:1])
    rope = [rope_from_inv_freq(_inv_freq(model, layer_attention(g, i).input[7])) for i in range(L)]
    window = dec.get("sliding_window") or {}
    return report({
        "vocab_size": cfg["model"]["vocab_size"],
        "hidden_size": dec["hidden_size"],
        "intermediate_size": int(_width(model, "/model/layers.0/mlp/gate_proj/")),
        "num_layers": L,
        "num_heads": int(gqa[0]["num_heads"]),
        "num_kv_heads": int(gqa[0]["kv_num_heads"]),
        "head_dim": dec["head_size"],
        "norm_unit_offset": bool(np.abs(stored - (1 + w)).max() < np.abs(stored - w).max()),
        "norm_placement": "sandwich" if node(g, "/model/layers.0/post_feedforward_layernorm/LayerNorm") else "pre",
        "norm_eps": float(np.float32(attrs(norm)["epsilon"])),
        "final_norm": any(n.name.startswith(f"/model/layers.{L}/final_norm_layernorm/") for n in g.graph.node),
        "gelu_approximate": "tanh" if approx == "tanh" or act.op_type == "FastGelu" else "none",
        "geglu": "gate" if act.input[0] == gate else "up",
        "embed_scale": scale,
        "embed_scale_dtype": "activation",  # a float32 constant on float32 activations
        "tied_head": tied,
        "query_scale": [float(a["scale"]) if a.get("scale") else 1.0 / math.sqrt(dec["head_size"]) for a in gqa],
        "rope_base": [b for b, _ in rope],
        "rope_scaling_factor": [f for _, f in rope],
        "attn_softcap": [float(a["softcap"]) if a.get("softcap") else None for a in gqa],
        "final_softcap": constant(g, div.input[1]) if div is not None else None,
        "sliding_window": [int(a["local_window_size"]) if a.get("local_window_size", -1) > 0 else None for a in gqa],
        "qk_norm": any("q_norm" in n.name for n in g.graph.node if n.name.startswith("/model/layers.0/")),
    }, {
        "builder": " ".join(model.command),
        "config_shim": model.shim and __import__("parity.adapters.ort_genai.build", fromlist=["x"]).SHIM_NOTE,
        "precision": model.precision,
        "embed_scale_constant": emb.input[1] if emb is not None else None,
        "genai_config": {"type": cfg["model"]["type"], "context_length": cfg["model"].get("context_length"),
                         "sliding_window": window, "past_present_share_buffer":
                         cfg.get("search", {}).get("past_present_share_buffer")},
        "attention": {k: gqa[0].get(k) for k in ("do_rotary", "rotary_interleaved", "sliding_window_cache")},
        "matmul_ops": sorted({n.op_type for n in g.graph.node if "MatMul" in n.op_type}),
        "quantization": _quantization(g),
    })


def _quantization(g) -> dict | None:
    """What the graph's quantized ops are set to: per (op, bits, block_size, accuracy_level), the modules."""
    out: dict[str, list[str]] = {}
    for n in g.graph.node:
        if n.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        a = attrs(n)
        key = f"{n.op_type} bits={a.get('bits')} block_size={a.get('block_size')}"
        if "accuracy_level" in a:
            key += f" accuracy_level={a['accuracy_level']}"
        out.setdefault(key, []).append(n.name.rsplit("/", 1)[0].replace("/model/", "") or n.name)
    return {k: f"{len(v)} ops: {', '.join(v[:6])}{', ...' if len(v) > 6 else ''}" for k, v in out.items()} or None


def _width(model, prefix: str) -> int:
    """The output width of the MatMul under `prefix`, from its op (MatMulNBits' N) or its weight's shape."""
    n = next(x for x in model.graph.graph.node if x.name.startswith(prefix))
    a = attrs(n)
    if "N" in a:
        return int(a["N"])
    return int(initializer(model, n.input[1]).shape[-1])
