"""The HF directory an mlx-lm user loads, written from the spec and the canonical weights, and loaded with
mlx-lm's own `load_model`.

mlx-lm's ModelArgs (mlx_lm/models/gemma.py, gemma2.py, gemma3_text.py; `BaseModelArgs.from_dict` keeps only the
keys its dataclass declares) reads the transformers-4.x keys: `rope_theta`, `rope_local_base_freq`,
`rope_scaling`, `sliding_window_pattern`. config.json carries them beside the transformers-5 keys
(parity.model.spec.to_hf_config writes both), so a key it never reads stays in the file, as in a checkpoint
from the Hub, and the readback shows what the built model took instead. The weights are stored in the run's
dtype, as a bf16/fp16 checkpoint ships: `load_model` keeps the stored dtype, so the model computes in it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from parity.model.spec import GemmaSpec, to_hf_config
from parity.model.weights import Weights

MX_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def sliding_window_pattern(spec: GemmaSpec) -> int | None:
    """The period mlx-lm's Gemma 3 derives its layer types from (layer i global iff (i + 1) % period == 0),
    when the spec's layer_types have that form; None when no period gives them (then the key is left out,
    mlx-lm takes its default 6, and the readback shows the layer types it built)."""
    types = spec.layer_types
    for period in range(1, len(types) + 1):
        if all((t == "global") == ((i + 1) % period == 0) for i, t in enumerate(types)):
            return period
    if "global" not in types:
        return len(types) + 1  # no layer global: a period longer than the model
    return None


def hf_config(spec: GemmaSpec) -> dict:
    cfg = to_hf_config(spec)
    if spec.family == 3:
        period = sliding_window_pattern(spec)
        if period is not None:
            cfg["sliding_window_pattern"] = period
    return cfg


def write(spec: GemmaSpec, weights: Weights, dtype: str, directory: Path) -> Path:
    """config.json + model.safetensors (canonical HF names; the tied head not stored) in `directory`."""
    import mlx.core as mx

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(spec), indent=1))
    target = getattr(mx, MX_DTYPES[dtype])
    arrays = {}
    for name in weights.tensors:
        buf = np.empty(weights.shape(name), np.float32)
        weights.read_into(name, buf)
        arrays[name] = mx.array(buf).astype(target)  # rounded once, float32 -> dtype, as a converter does
    mx.save_safetensors(str(directory / "model.safetensors"), arrays, metadata={"format": "mlx"})
    return directory


def load(directory: Path):
    """mlx-lm's `load_model` on the directory: (model, the config dict it read)."""
    from mlx_lm.utils import load_model

    return load_model(Path(directory), strict=True)


def load_shipped(directory: Path, dtype: str):
    """mlx-lm's `load_model` on a checkpoint directory as shipped (its own config reading and `sanitize`), cast to
    the run's dtype as `mlx_lm.convert --dtype` casts (every floating parameter its `cast_predicate` allows):
    (model, config, how it was loaded). Raises whatever mlx-lm raises."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path

    model, config = load(directory)
    target = getattr(mx, MX_DTYPES[dtype])
    stored = {str(v.dtype) for _, v in tree_flatten(model.parameters())}
    how = f"mlx-lm's load_model({directory})"
    if stored != {str(target)}:
        cast = getattr(model, "cast_predicate", lambda _: True)
        model.update(tree_map_with_path(
            lambda k, v: v.astype(target) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters()))
        how += f", stored {'/'.join(sorted(s.replace('mlx.core.', '') for s in stored))} cast to {dtype} as " \
               "mlx_lm.convert --dtype casts"
    return model, config, how

