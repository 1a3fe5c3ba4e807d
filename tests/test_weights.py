import numpy as np
import pytest

from parity.errors import ParityInputError
from parity.model.weights import canonical_shapes, load_weights, map_weights, random_weights, save_weights


def test_random_weights_are_deterministic_realistic_and_bf16_exact(tiny):
    import ml_dtypes

    a, b = random_weights(tiny, 0), random_weights(tiny, 0)
    assert a.hash == b.hash and a.hash != random_weights(tiny, 1).hash
    for name, t in a.tensors.items():
        assert np.array_equal(t.astype(ml_dtypes.bfloat16).astype(np.float32), t), name
        if name.endswith("norm.weight"):
            assert np.abs(t).min() >= 0.09, f"{name}: norm weights must stay away from zero"
    gate = a.tensors["model.layers.0.mlp.gate_proj.weight"]
    assert 0.5 < gate.std() * np.sqrt(tiny.hidden_size) < 1.5  # 1/sqrt(fan_in), not 0.02


def test_save_load_round_trip(tiny, tiny_weights, tmp_path):
    p = save_weights(tiny_weights, tmp_path / "w.safetensors")
    back = load_weights(p)
    assert back.spec == tiny and back.hash == tiny_weights.hash


def test_missing_extra_wrong_shape_and_nan_are_refused(tiny, tiny_weights, tmp_path):
    from safetensors.numpy import save_file

    t = dict(tiny_weights.tensors)
    t.pop("model.norm.weight")
    save_file(t, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ParityInputError, match="missing, first 'model.norm.weight'"):
        load_weights(tmp_path / "missing.safetensors", tiny)
    t = dict(tiny_weights.tensors, **{"model.norm.weight": np.zeros(95, np.float32)})
    save_file(t, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ParityInputError, match=r"shape \(95,\), the spec needs \(96,\)"):
        load_weights(tmp_path / "shape.safetensors", tiny)
    nan = dict(tiny_weights.tensors)
    nan["model.layers.1.mlp.up_proj.weight"] = nan["model.layers.1.mlp.up_proj.weight"].copy()
    nan["model.layers.1.mlp.up_proj.weight"][0, 0] = np.nan
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ParityInputError, match="NaN"):
        load_weights(tmp_path / "nan.safetensors", tiny)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01junk")
    with pytest.raises(ParityInputError, match="not a readable safetensors"):
        load_weights(tmp_path / "junk.safetensors", tiny)


@pytest.mark.parametrize("module,cls", [("parity.adapters.litgpt_style", "NAME_MAP_PRE"),
                                        ("parity.adapters.hf", "NAME_MAP")])
def test_name_maps_use_every_tensor_once(tiny, tiny_weights, module, cls):
    """Built models: every canonical tensor lands in exactly one parameter, every parameter is filled."""
    from parity.adapters import get_adapter

    name = {"parity.adapters.litgpt_style": "litgpt-style", "parity.adapters.hf": "hf"}[module]
    model = get_adapter(name).build(tiny, tiny_weights, "float32")
    n_params = sum(1 for _ in model.named_parameters())
    expected = len(canonical_shapes(tiny)) - 2 * tiny.num_layers  # q, k, v fuse into one in the port
    assert n_params == (expected if name == "litgpt-style" else len(canonical_shapes(tiny)))


def test_map_weights_refuses_duplicates_and_gaps():
    t = {"a.weight": np.zeros(2), "b.weight": np.zeros(2)}
    with pytest.raises(ParityInputError, match="two canonical tensors"):
        map_weights(t, {"a.weight": "x", "b.weight": "x"}, {"x": (2,)}, "test")
    with pytest.raises(ParityInputError, match="got no weight"):
        map_weights(t, {"a.weight": "x", "b.weight": None}, {"x": (2,), "y": (2,)}, "test")
    with pytest.raises(ParityInputError, match="no entry in the name map"):
        map_weights(t, {"a.weight": "x"}, {"x": (2,)}, "test")
    with pytest.raises(ParityInputError, match="needs"):
        map_weights({"a.weight": np.zeros(3)}, {"a.weight": "x"}, {"x": (2,)}, "test")


def test_fused_qkv_layout_is_grouped(tiny, tiny_weights):
    """Per kv group: its query heads, then its key head, then its value head."""
    from parity.adapters.litgpt_style import fuse_qkv

    fused = fuse_qkv(tiny_weights.tensors, tiny)["model.layers.0.self_attn.qkv.weight"]
    hd, g = tiny.head_dim, tiny.num_heads // tiny.num_kv_heads
    q = tiny_weights.tensors["model.layers.0.self_attn.q_proj.weight"]
    k = tiny_weights.tensors["model.layers.0.self_attn.k_proj.weight"]
    block = (g + 2) * hd
    assert np.array_equal(fused[block: block + g * hd], q[g * hd: 2 * g * hd])  # group 1's queries
    assert np.array_equal(fused[block + g * hd: block + (g + 1) * hd], k[hd: 2 * hd])  # group 1's key
