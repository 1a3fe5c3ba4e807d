"""litgpt's fused q/k/v (parity.formats.litgpt): fusing then splitting gives back every projection, and the
port's lazily planned fuse writes the same rows as the array one."""

import numpy as np
import pytest

from parity.formats.litgpt import FUSED, LAYOUTS, fuse_qkv, split_qkv
from parity.adapters.litgpt_style import fuse_qkv_parts
from parity.model.presets import PRESETS
from parity.model.weights import fill, parts, random_weights


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads,kv", [(4, 1), (4, 2), (6, 3)])
def test_fuse_then_split_is_the_identity(layout, heads, kv):
    spec = PRESETS["tiny-gemma"].replace(num_heads=heads, num_kv_heads=kv, num_layers=2)
    w = random_weights(spec, 0)
    fused = fuse_qkv(w.tensors, spec, layout)
    assert not any(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) for k in fused)
    back = dict(fused)
    split_qkv(back, spec, layout, "test")
    assert sorted(back) == sorted(w.tensors)
    for name, t in w.tensors.items():
        assert np.array_equal(back[name], t), name
        assert back[name].flags.c_contiguous, name


@pytest.mark.parametrize("stacked", [False, True])
def test_the_ports_plan_is_the_same_layout(tiny, tiny_weights, stacked):
    plan = fuse_qkv_parts(parts(tiny_weights), tiny, stacked)[FUSED.format(1)]
    got = fill(tiny_weights, plan, np.empty(plan.shape, np.float32))
    want = fuse_qkv(tiny_weights.tensors, tiny, "stacked" if stacked else "grouped")[FUSED.format(1)]
    assert np.array_equal(got, want)


def test_a_fused_weight_of_the_wrong_shape_names_the_file(tiny, tiny_weights):
    from parity.errors import ParityInputError

    fused = fuse_qkv(tiny_weights.tensors, tiny, "stacked")
    fused[FUSED.format(0)] = fused[FUSED.format(0)][:-1]
    with pytest.raises(ParityInputError, match="lit_model.safetensors: layer 0's fused qkv has shape"):
        split_qkv(fused, tiny, "stacked", "lit_model.safetensors")
