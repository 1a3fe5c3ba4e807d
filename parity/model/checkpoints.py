"""Load a real checkpoint directory into (spec, canonical weights), without executing pickled code.

Three layouts are recognised, by the files in the directory:

* **HuggingFace** — `config.json` (with a `model_type`) and `model.safetensors`,
  or shards `model-0000X-of-0000N.safetensors` listed by
  `model.safetensors.index.json`. The spec comes from `config.json`
  (`parity.model.spec.from_hf_config`); a Gemma 3 multimodal config (`text_config`)
  keeps its text weights under `language_model.model.*` (what transformers 5
  writes) or `model.language_model.*` (its in-memory names); the vision tower
  and projector are skipped.
* **keras-hub preset** — what `backbone.save_to_preset(dir)` writes:
  `config.json` (`{"module", "class_name": "GemmaBackbone", "config"}`),
  `metadata.json`, and `model.weights.h5` (or `model.weights.json` with
  `model_0000X.weights.h5` shards). Read with h5py alone: keras is not
  imported. Keras 3 stores each layer's variables as datasets `0, 1, ...` in a
  group `<attribute path>/vars` whose `name` attribute is the keras layer's name;
  the variables are located by those layer names (`decoder_block_3/attention/query`);
  the names, the layouts and the config's options are read through
  `parity.formats.keras_hub`, the format the keras-hub adapter builds with.
* **litgpt** — `model_config.yaml` and `lit_model.safetensors` (litgpt itself
  writes `lit_model.pth`, a pickle, which is refused). The spec comes from the
  litgpt `Config` fields; names go through the litgpt adapter's `NAME_MAP_*`
  inverted, and the fused q/k/v is split back by `parity.formats.litgpt` (0.5 `attn.qkv` [Q; K; V]
  stacked, 0.4 `attn.attn` grouped per kv group).

Pickles (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) are never opened: a directory that
only has those is refused with one line naming the file and the fix (convert
to safetensors). Safetensors files are read with `parity.model.tensor_file`, a
tensor at a time and converted to float32 a block of rows at a time (bf16 by
its bits, so no torch is needed). Every path ends in
`parity.model.weights.check_tensors`: a missing tensor, a wrong shape or a NaN is a
one-line `ParityInputError`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from parity.errors import ParityInputError
from parity.formats import keras_hub as keras_format
from parity.model.spec import GemmaSpec, from_hf_config
from parity.model.tensor_file import TensorFile
from parity.model.weights import Checkpoint, Weights, check_tensors

HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
KERAS_WEIGHTS = "model.weights.h5"
KERAS_SHARDS = "model.weights.json"
LIT_CONFIG = "model_config.yaml"
LIT_WEIGHTS = "lit_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

EXPECTED = (
    f"a HuggingFace directory (config.json + {HF_SINGLE}, or {HF_INDEX} + its shards), "
    f"a keras-hub preset (config.json + metadata.json + {KERAS_WEIGHTS} or {KERAS_SHARDS}), "
    f"or a litgpt directory ({LIT_CONFIG} + {LIT_WEIGHTS})"
)


def load_checkpoint(path: str | Path) -> tuple[GemmaSpec, Weights]:
    """The spec and canonical (HF-named, float32) weights of a local checkpoint directory."""
    d = Path(path)
    if d.is_file():  # a file inside the checkpoint (config.json, model.safetensors, ...): its directory
        if d.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(d.parent, d.name)
        d = d.parent
    if not d.is_dir():
        raise ParityInputError(f"checkpoint {str(path)!r} does not exist; give a checkpoint directory: {EXPECTED}")
    names = {p.name for p in d.iterdir() if p.is_file()}
    hf_cfg = keras_cfg = None
    if "config.json" in names:
        cfg = _read_json(d / "config.json")
        if isinstance(cfg, dict) and "class_name" in cfg and "config" in cfg:
            keras_cfg = cfg
        else:
            hf_cfg = cfg
    if LIT_WEIGHTS in names:
        if LIT_CONFIG not in names:
            raise ParityInputError(f"{d}: has {LIT_WEIGHTS} but no {LIT_CONFIG}; "
                                   "copy the model_config.yaml litgpt wrote next to it")
        return _load_litgpt(d)
    if hf_cfg is not None and (HF_SINGLE in names or HF_INDEX in names):
        return _load_hf(d, hf_cfg)
    if keras_cfg is not None and (KERAS_WEIGHTS in names or KERAS_SHARDS in names):
        return _load_keras(d, keras_cfg)
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        _refuse_pickle(d, "lit_model.pth" if "lit_model.pth" in pickles else pickles[0])
    found = sorted(names)
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} files)" if len(found) > 8 else "")
    raise ParityInputError(f"{d}: no checkpoint layout recognised (found: {shown or 'no files'}); expected {EXPECTED}")


def _refuse_pickle(d: Path, name: str) -> None:
    how = ("safetensors.torch.save_file(torch.load('lit_model.pth', weights_only=True), 'lit_model.safetensors')"
           if name == "lit_model.pth" else
           "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir), which writes model.safetensors")
    raise ParityInputError(
        f"{d / name}: a pickled torch checkpoint, which parity never loads (unpickling runs code); "
        f"convert to safetensors where you trust the file ({how})"
    )


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParityInputError(f"{p}: not valid JSON ({e}); fix or re-export the file") from None


def _finish(spec: GemmaSpec, tensors: dict[str, np.ndarray], source: str,
            checkpoint: Checkpoint | None = None) -> tuple[GemmaSpec, Weights]:
    if spec.tied_head and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        emb = tensors.get("model.embed_tokens.weight")
        if emb is None or head.shape != emb.shape or not np.array_equal(head, emb):
            raise ParityInputError(
                f"{source}: the config ties the output head to the embedding, but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings to false in the config"
            )
    check_tensors(spec, tensors, where=source)
    return spec, Weights(spec, tensors, source=source, checkpoint=checkpoint)


# --------------------------------------------------------------- HuggingFace
# Gemma 3 multimodal: text weights' prefixes (transformers 5 writes the first, holds the second in memory)
_MM_TEXT = (("language_model.model.", "model."), ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


def _load_hf(d: Path, cfg) -> tuple[GemmaSpec, Weights]:
    spec = from_hf_config(cfg, where=str(d / "config.json"))
    multimodal = "text_config" in cfg
    if (d / HF_SINGLE).is_file():
        files = {n: HF_SINGLE for n in TensorFile(d / HF_SINGLE).keys()}
    else:
        files = _hf_index(d)
    opened: dict[str, TensorFile] = {}
    tensors: dict[str, np.ndarray] = {}
    ignored = 0
    for name, shard in files.items():
        canon = _hf_canonical(name, multimodal)
        if canon is None:
            continue
        if _kv_shared_unused(canon, spec):
            ignored += 1
            continue
        if shard not in opened:
            opened[shard] = TensorFile(d / shard)
        st = opened[shard]
        if name not in st:
            raise ParityInputError(f"{d / HF_INDEX}: lists tensor {name!r} in {shard}, which does not hold it; "
                                   "the index and the shards disagree: re-save the checkpoint")
        if canon in tensors:
            raise ParityInputError(f"{d}: two tensors map to {canon!r} (one is {name!r}); remove the duplicate")
        tensors[canon] = st.float32(name)
    note = f"; {ignored} k/v tensors of KV-shared layers not loaded, as transformers ignores them" if ignored else ""
    return _finish(spec, tensors, f"{d} (hf{note})", Checkpoint(str(d.resolve()), "hf"))


_KV_OWN = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight$")


def _kv_shared_unused(canon: str, spec: GemmaSpec) -> bool:
    """A Gemma 4 KV-shared layer's own k/v projection or norm: released checkpoints carry them, the layer
    reads its source's keys and values instead, and transformers drops them on load
    (`Gemma4TextModel._keys_to_ignore_on_load_unexpected`); so does parity."""
    m = _KV_OWN.match(canon) if spec.family == 4 and spec.num_kv_shared_layers else None
    return m is not None and int(m.group(1)) >= spec.first_kv_shared


def _hf_index(d: Path) -> dict[str, str]:
    index = _read_json(d / HF_INDEX)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise ParityInputError(f"{d / HF_INDEX}: has no weight_map; re-save the checkpoint with save_pretrained")
    for shard in sorted(set(wm.values())):
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise ParityInputError(f"{d / HF_INDEX}: shard {shard!r} is not a .safetensors file name in the "
                                   "directory; fix the index")
        if not (d / shard).is_file():
            raise ParityInputError(f"{d / HF_INDEX}: lists shard {shard!r}, which is missing from {d}; "
                                   "copy every shard of the checkpoint")
    return dict(wm)


def _hf_canonical(name: str, multimodal: bool) -> str | None:
    """The canonical name of a checkpoint tensor, or None for tensors that are not weights of the text model."""
    if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
        return None
    if not multimodal:
        return name
    for prefix, canon in _MM_TEXT:
        if name.startswith(prefix):
            return canon + name[len(prefix):]
    return None  # vision tower, multimodal projector


# ----------------------------------------------------------------- keras-hub
keras_name_map = keras_format.name_map  # canonical -> keras variable path; its home is parity.formats.keras_hub


# keras layers that hold several variables of their own, in the order the layer creates them (what
# save_to_preset writes as datasets 0, 1, ...): Gemma4 MoE's expert bank (keras_hub gemma4_moe.py build)
KERAS_VAR_ORDER = {"moe_expert_bank": ("gate_proj", "up_proj", "down_proj", "per_expert_scale")}


def _load_keras(d: Path, cfg: dict) -> tuple[GemmaSpec, Weights]:
    spec = keras_format.spec_from_config(cfg, where=str(d / "config.json"), name=d.name or "keras-hub")
    wanted: dict[str, dict[str, str]] = {}  # keras layer path -> {dataset index: canonical name}
    for canon, var in keras_format.variable_paths(spec).items():
        layer, _, vname = var.rpartition("/")
        order = KERAS_VAR_ORDER.get(layer.rpartition("/")[2])
        wanted.setdefault(layer, {})[str(order.index(vname)) if order else "0"] = canon
    groups = _keras_groups(d)
    unused = sorted(p for p, g in groups.items() if g["data"] and p not in wanted)
    if unused:
        raise ParityInputError(f"{d}: keras layer {unused[0]!r} holds variables that a Gemma backbone does not "
                               "have (LoRA, quantization?); merge or drop them and re-save the preset")
    raw = {}
    for layer, canons in wanted.items():
        data = groups.get(layer, {}).get("data", {})
        if not data:
            raise ParityInputError(f"{d}: keras layer {layer!r} has no weights in the preset (tensor "
                                   f"{next(iter(canons.values()))!r}); the preset does not match its config.json: "
                                   "re-save it")
        if set(data) != set(canons):
            raise ParityInputError(f"{d}: keras layer {layer!r} holds {len(data)} variables, a Gemma backbone "
                                   f"holds {len(canons)} (untied or quantized embeddings?); re-save a plain "
                                   "keras-hub backbone")
        for index, canon in canons.items():
            raw[canon] = _h5_float32(data[index], layer)
    return _finish(spec, keras_format.from_keras_layout(raw, spec, str(d)), f"{d} (keras-hub)",
                   Checkpoint(str(d.resolve()), "keras-hub"))


def _keras_groups(d: Path) -> dict[str, dict]:
    """keras layer path (layer names joined by '/') -> {"data": {index: dataset}} over every weights file."""
    try:
        import h5py
    except ImportError:
        raise ParityInputError("reading a keras-hub preset needs h5py: pip install h5py") from None
    if (d / KERAS_WEIGHTS).is_file():
        files = [d / KERAS_WEIGHTS]
    else:
        index = _read_json(d / KERAS_SHARDS)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ParityInputError(f"{d / KERAS_SHARDS}: has no weight_map; re-save the preset")
        shards = sorted({s for v in wm.values() for s in (v if isinstance(v, list) else [v])})
        for s in shards:
            if not isinstance(s, str) or Path(s).name != s or not (d / s).is_file():
                raise ParityInputError(f"{d / KERAS_SHARDS}: lists shard {s!r}, which is missing from {d}; "
                                       "copy every shard of the preset")
        files = [d / s for s in shards]
    names: dict[str, str] = {}  # h5 group path -> keras layer name (from the vars group's "name" attribute)
    data: dict[str, dict] = {}  # h5 group path -> {index: dataset}
    for fp in files:
        try:
            f = h5py.File(fp, "r")
        except OSError as e:
            raise ParityInputError(f"{fp}: not a readable HDF5 file ({e}); re-save the preset") from None
        found: list[str] = []
        f.visit(lambda n, found=found: found.append(n) if n == "vars" or n.endswith("/vars") else None)
        for n in found:
            g = f[n]
            if not isinstance(g, h5py.Group):
                continue
            owner = n[: -len("vars")].rstrip("/")
            if "name" in g.attrs:
                names[owner] = str(g.attrs["name"])
            for k in g:
                if g.get(k, getlink=True).__class__ is not h5py.HardLink:  # as keras refuses soft/external links
                    raise ParityInputError(f"{fp}: {n}/{k} is a link, not stored data; re-save the preset")
                data.setdefault(owner, {})[k] = g[k]
    # "layers/gemma_decoder_block_1/attention/query_dense" -> "decoder_block_1/attention/query": each
    # ancestor that is a keras layer contributes its name; containers ("layers") contribute nothing
    out: dict[str, dict] = {}
    for owner, held in data.items():
        parts = owner.split("/")
        prefixes = ["/".join(parts[:i + 1]) for i in range(len(parts))]
        layer = "/".join(names.get(p, parts[i]) for i, p in enumerate(prefixes) if p in names or p == owner)
        if layer in out:
            raise ParityInputError(f"{d}: two keras layers with weights are named {layer!r}; re-save the preset")
        out[layer] = {"data": held}
    return out


def _h5_float32(ds, layer: str) -> np.ndarray:
    a = ds[()]
    if ds.attrs.get("dtype") == "bfloat16" and a.dtype.itemsize == 2:  # keras writes bf16 as 2-byte opaque
        import ml_dtypes

        a = a.view(ml_dtypes.bfloat16)
    elif a.dtype.kind != "f":
        raise ParityInputError(f"keras layer {layer!r} stores {a.dtype}, not floating point; "
                               "dequantize and re-save the preset")
    return a.astype(np.float32, copy=False)


# -------------------------------------------------------------------- litgpt
# litgpt Config fields that must hold these values for the model to be a Gemma the spec describes
_LIT_FIXED = {
    "mlp_class_name": "GemmaMLP", "norm_class_name": "RMSNorm", "parallel_residual": False,
    "shared_attention_norm": False, "bias": False, "attn_bias": False, "lm_head_bias": False,
    "rotary_percentage": 1.0, "rope_condense_ratio": 1, "rope_interleave": False, "n_expert": 0,
    "latent_attention": None, "norm_qk_type": "default", "norm_1": True, "norm_2": True,
}


def _litgpt_spec(d: Path, c: dict) -> GemmaSpec:
    where = d / LIT_CONFIG

    def bad(field: str, why: str) -> None:
        raise ParityInputError(f"{where}: {field}={c.get(field)!r} {why}")

    for f, want in _LIT_FIXED.items():
        if f in c and c[f] != want:
            bad(f, f"is not Gemma's ({want!r}); parity compares Gemma models only")
    for f in ("n_layer", "n_embd", "n_head", "vocab_size"):
        if not isinstance(c.get(f), int):
            bad(f, "must be an integer; re-save model_config.yaml from the litgpt Config")
    n, heads, hidden = c["n_layer"], c["n_head"], c["n_embd"]
    if c.get("post_attention_norm", False) != c.get("post_mlp_norm", False):
        bad("post_attention_norm", f"but post_mlp_norm={c.get('post_mlp_norm')!r}; a spec has pre-norm or "
            "sandwich norms, not one of each")
    adj = c.get("rope_adjustments")
    if adj is not None and set(adj) != {"factor"}:
        bad("rope_adjustments", "is not a plain linear factor; parity's spec has linear rope scaling only")
    gelu = c.get("gelu_approximate", "none")
    if gelu not in ("tanh", "none"):
        bad("gelu_approximate", "is not 'tanh' or 'none'")
    # per-layer windows: 0.5 sliding_window_indices (default: every layer), 0.4 sliding_window_layer_placing
    window = c.get("sliding_window_size")
    if window is None:
        local = [0] * n
    elif c.get("sliding_window_indices") is not None:
        local = [int(x) for x in c["sliding_window_indices"]][:n]
    elif c.get("sliding_window_layer_placing") == "interleaved":
        local = [int(i % 2 == 0) for i in range(n)]
    else:
        local = [1] * n
    rope_local = c.get("rope_local_base_freq")
    if rope_local is not None:
        rope_idx = [int(x) for x in (c.get("rope_indices") or [1] * n)][:n]
        if rope_idx != local:
            bad("rope_indices", f"differs from the sliding-window layers {local}; a spec gives the local rope "
                "base to exactly the windowed layers")
    qk_norm = bool(c.get("norm_qk", False))
    sandwich = bool(c.get("post_attention_norm", False))
    factor = float(adj["factor"]) if adj else 1.0
    if qk_norm or (rope_local is not None and float(rope_local) != float(c.get("rope_base", 10000))) \
            or factor != 1.0:
        family = 3
    elif sandwich or any(local) or c.get("attention_logit_softcapping") is not None \
            or c.get("final_logit_softcapping") is not None:
        family = 2
    else:
        family = 1
    head = c.get("head_size") or hidden // heads
    scalar = c.get("attention_scores_scalar")
    kw: dict = dict(
        family=family, name=c.get("name") or d.name, vocab_size=int(c.get("padded_vocab_size") or c["vocab_size"]),
        hidden_size=hidden, intermediate_size=int(c.get("intermediate_size") or 4 * hidden), num_layers=n,
        num_heads=heads, num_kv_heads=int(c.get("n_query_groups") or heads), head_dim=int(head),
        max_position=int(c.get("block_size", 4096)), norm_eps=float(c.get("norm_eps", 1e-5)),
        norm_unit_offset="Gemma" in str(c.get("name", "")),  # litgpt's rule (Config.norm_class)
        norm_placement="sandwich" if sandwich else "pre", gelu_approximate=gelu,
        embed_scale=bool(c.get("scale_embeddings", False)), rope_base=float(c.get("rope_base", 10000)),
        query_pre_attn_scalar=None if (family == 1 and scalar in (None, head)) else (scalar or None),
        qk_norm=qk_norm, tied_head=True,  # decided from the weights in _load_litgpt
    )
    if family >= 2:
        kw.update(attn_softcap=c.get("attention_logit_softcapping"),
                  final_softcap=c.get("final_logit_softcapping"), rope_scaling_factor=factor)
        if any(local):
            kw["layer_types"] = tuple("local" if x else "global" for x in local)
            kw["sliding_window"] = int(window)
        if family == 3 and rope_local is not None and any(local):
            kw["rope_local_base"] = float(rope_local)
    return GemmaSpec(**kw)


def _load_litgpt(d: Path) -> tuple[GemmaSpec, Weights]:
    import dataclasses

    from parity.formats.litgpt import FUSED, LAYOUT_OF, NAME_MAP_PRE, NAME_MAP_SANDWICH, QKV_TARGET, split_qkv

    try:
        import yaml
    except ImportError:
        raise ParityInputError("reading model_config.yaml needs pyyaml: pip install pyyaml") from None
    try:
        c = yaml.safe_load((d / LIT_CONFIG).read_text())  # safe_load: plain data only, never python objects
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        msg = str(e).replace("\n", " ")
        raise ParityInputError(f"{d / LIT_CONFIG}: not plain YAML ({msg}); re-save it with litgpt's save_config") \
            from None
    if not isinstance(c, dict):
        raise ParityInputError(f"{d / LIT_CONFIG}: expected a mapping of litgpt Config fields")
    spec = _litgpt_spec(d, c)
    base = NAME_MAP_SANDWICH if spec.norm_placement == "sandwich" else NAME_MAP_PRE
    inverse = {v: k for k, v in base.items() if v is not None and "qkv" not in k}
    for target in QKV_TARGET.values():
        inverse[target] = FUSED
    st = TensorFile(d / LIT_WEIGHTS)
    tensors: dict[str, np.ndarray] = {}
    layouts = set()
    for name in st.keys():
        key = re.sub(r"\.\d+\.", ".{}.", name, count=1)
        if key not in inverse:
            raise ParityInputError(f"{d / LIT_WEIGHTS}: tensor {name!r} is not a litgpt Gemma parameter this "
                                   "spec has; check model_config.yaml matches the weights")
        m = re.search(r"\.(\d+)\.", name)
        canon = inverse[key].format(m.group(1)) if m else inverse[key]
        if key in LAYOUT_OF:
            layouts.add(LAYOUT_OF[key])
        tensors[canon] = st.float32(name)
    if len(layouts) > 1:
        raise ParityInputError(f"{d / LIT_WEIGHTS}: mixes attn.qkv (litgpt 0.5) and attn.attn (0.4) tensors; "
                               "re-save it from one litgpt version")
    split_qkv(tensors, spec, layouts.pop() if layouts else "stacked", str(d / LIT_WEIGHTS))
    head, emb = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is not None and emb is not None and head.shape == emb.shape and np.array_equal(head, emb):
        del tensors["lm_head.weight"]  # litgpt stores the tied head as a copy of the embedding
    else:
        spec = dataclasses.replace(spec, tied_head=False)
    return _finish(spec, tensors, f"{d} (litgpt)")
