"""The builder's ONNX graph: where each canonical tap is, and a copy with every one of them made a graph output.

The builder names its nodes after HF's modules (`/model/layers.{i}/mlp/gate_proj/MatMul`, `.../MatMul_Q4` when
quantized), so a tap is found as the first output of the node under a module path. The residual stream is the
optional output 3 of each `SkipSimplifiedLayerNormalization` (the sum it normalizes); the builder leaves it
unnamed where nothing reads it (the final norm's), so it is named here. The copy is saved beside a hard link to
the builder's weight file and `genai_config.json` points `decoder.filename` at it: the generator then runs the
builder's graph unchanged, with more outputs (Polygraphy's way of exposing intermediates).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from parity.model.spec import GemmaSpec
from parity.model.taps import tap_names

DATA = "model.onnx.data"
TAPS_MODEL = "model_taps.onnx"


def load(folder: Path):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def nodes_by_name(model) -> dict:
    return {n.name: n for n in model.graph.node}


def first_output(model, prefix: str) -> str:
    """Output 0 of the node named `prefix` + its op (MatMul, MatMul_Q4, LayerNorm, ...): the module's output."""
    hits = [n for n in model.graph.node if n.name.startswith(prefix) and n.output and n.output[0]]
    if not hits:
        raise RuntimeError(f"ort-genai: no node under {prefix!r} in the builder's graph; this builder names its "
                           "nodes differently: update adapters/ort_genai/graph.py")
    return hits[-1].output[0]  # a quantized MatMul may be preceded by its input's Cast/Quantize: the last is the op


def residual(model, norm: str) -> str:
    """The sum a SkipSimplifiedLayerNormalization normalizes (its output 3), named if the builder left it out."""
    hits = [n for n in model.graph.node if n.name.startswith(norm + "/") and n.op_type.startswith("Skip")]
    if not hits:
        raise RuntimeError(f"ort-genai: {norm!r} is no SkipSimplifiedLayerNormalization in the builder's graph; "
                           "update adapters/ort_genai/graph.py")
    node = hits[0]
    while len(node.output) < 4:
        node.output.append("")
    if not node.output[3]:
        node.output[3] = f"{norm}/output_3"
    return node.output[3]


def tap_values(model, spec: GemmaSpec) -> dict[str, str]:
    """canonical tap -> the ONNX value that holds it (every tap but the attention internals)."""
    L = spec.num_layers
    out = {"embed": first_output(model, "/model/embed_tokens/Mul"),
           "final_norm": first_output(model, f"/model/layers.{L}/final_norm_layernorm/"),
           "logits": "logits"}
    sandwich = spec.norm_placement == "sandwich"
    for i in range(L):
        p, m = f"layers.{i}.", f"/model/layers.{i}/"
        out[p + "attn_norm"] = first_output(model, m + "input_layernorm/")
        out[p + "attn"] = first_output(model, m + "attn/o_proj/")
        pre_mlp = m + ("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm")
        if sandwich:
            out[p + "post_attn_norm"] = first_output(model, m + "post_attention_layernorm/")
            out[p + "post_mlp_norm"] = first_output(model, m + "post_feedforward_layernorm/")
        out[p + "attn_residual"] = residual(model, pre_mlp)
        out[p + "mlp_norm"] = first_output(model, pre_mlp + "/")
        out[p + "mlp.gate"] = first_output(model, m + "mlp/gate_proj/")
        out[p + "mlp.up"] = first_output(model, m + "mlp/up_proj/")
        out[p + "mlp.act"] = first_output(model, m + "mlp/act_fn/")
        out[p + "mlp.hidden"] = first_output(model, m + "mlp/Mul")
        out[p + "mlp"] = first_output(model, m + "mlp/down_proj/")
        nxt = f"/model/layers.{i + 1}/input_layernorm" if i + 1 < L else f"/model/layers.{L}/final_norm_layernorm"
        out[p + "out"] = residual(model, nxt)
    missing = sorted(set(tap_names(spec)) - set(out))
    if missing:
        raise RuntimeError(f"ort-genai: no ONNX value for taps {missing}; update adapters/ort_genai/graph.py")
    return out


def expose(model, names) -> None:
    """Add each value to graph.output (type and shape left to the runtime), once."""
    import onnx

    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)


def save_run_dir(model, built: Path, run_dir: Path) -> Path:
    """The edited graph in `run_dir`, the builder's weights linked in, genai_config.json pointing at it."""
    import onnx

    run_dir.mkdir(parents=True, exist_ok=True)
    if (built / DATA).exists() and not (run_dir / DATA).exists():
        # the initializers refer to it by this relative name; onnxruntime refuses a symlink that leaves the
        # model's folder, so a hard link (run_dir sits beside the build), or a copy across file systems
        try:
            os.link(built / DATA, run_dir / DATA)
        except OSError:
            shutil.copyfile(built / DATA, run_dir / DATA)
    onnx.save(model, str(run_dir / TAPS_MODEL))
    cfg = json.loads((built / "genai_config.json").read_text())
    cfg["model"]["decoder"]["filename"] = TAPS_MODEL
    (run_dir / "genai_config.json").write_text(json.dumps(cfg, indent=1))
    return run_dir
