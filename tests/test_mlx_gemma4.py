"""`--impls mlx` on Gemma 4: mlx-lm's own gemma4_text classes against the float64 port, through the CLI.

tiny-gemma4 (per-layer inputs, KV-shared layers with a double-wide MLP, proportional RoPE, two head sizes)
passes in float32, cumulative and decode through mlx-lm's caches past the window; tiny-gemma4-moe (experts
beside the dense MLP, K=V) passes in float32 with the router's taps compared. A layer scalar dropped from
mlx-lm's own decoder layer is located at the first block output and named.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import textwrap

import pytest

# found, not imported: collecting the suite imports no framework (tests/test_collection.py)
if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
    pytest.skip("mlx / mlx-lm are not installed (pip install 'parity[mlx]')", allow_module_level=True)

from parity.report.cli import main as report_main  # noqa: E402

FUSED = {"rope.cos"} | {f"layers.{i}.{t}" for i in range(6) for t in ("attn.scores", "attn.probs", "mlp.act")}


def report(tmp_path, *args: str) -> tuple[int, dict]:
    code = report_main(["--impls", "mlx", "--out", str(tmp_path), "--quiet", "--dtypes", "float32", *args])
    return code, json.loads((tmp_path / "report.json").read_text())


def verdicts(r: dict) -> dict:
    return {v["mode"]: v for v in r["verdicts"]}


def passed(r: dict, mode: str) -> set[str]:
    return {e["tap"] for e in r["taps"] if e["mode"] == mode and e["passed"]}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return report(tmp_path_factory.mktemp("g4"), "--spec", "tiny-gemma4", "--decode", "auto")


def test_dense_passes_cumulative_and_decode_past_the_window(dense):
    code, r = dense
    assert code == 0 and r["status"] == "PASS", r["headline"]
    v = verdicts(r)
    for mode in ("cumulative", "decode", "decode-self"):
        assert v[mode]["status"] == "PASS" and v[mode]["first_divergence"] is None
    assert set(v["cumulative"]["not_compared"]) == FUSED
    taps = passed(r, "cumulative")  # recorded from mlx-lm: the keyword input, the PLE branch, the operand
    assert {"layers.5.per_layer_input", "layers.5.ple", "layers.5.pre_scalar", "layers.4.mlp.hidden"} <= taps
    # decode: every layer's cache, the KV-shared layers 4 and 5 through their sources' caches
    assert len(r["decode"]["continuation"]) > 16
    assert {f"layers.{i}.cache.{kv}" for i in range(6) for kv in "kv"} <= passed(r, "decode")


def test_dense_effective_matches_the_spec_and_shows_kv_sharing(dense):
    from parity.model.effective import differences

    _, r = dense
    assert differences(r["effective"], r["reference"]) == []
    lib = r["effective"]["mlx@float32"]["library"]
    assert lib["kv_source"] == {"4": 2, "5": 3} == lib["kv_source_rule"]  # observed by identity, as built
    assert lib["head_dim_per_layer"] == [32, 32, 32, 64, 32, 64]
    assert lib["own_kv"] == [True] * 4 + [False] * 2 and lib["mlp_width_per_layer"] == [128] * 4 + [256] * 2
    assert "ProportionalRoPE" in lib["rope"] and "8 of 32 frequencies rotate" in lib["rope"]


def test_moe_passes_with_the_router_recorded(tmp_path):
    code, r = report(tmp_path, "--spec", "tiny-gemma4-moe")
    assert code == 0 and r["status"] == "PASS", r["headline"]
    v = verdicts(r)["cumulative"]
    assert "mx.softmax over [T, k]" in v["not_compared"]["layers.0.moe.router_probs"]
    assert {f"layers.0.moe.{t}" for t in ("router_logits", "experts", "weights")} | {
        "layers.0.dense_branch", "layers.0.moe_branch"} <= passed(r, "cumulative")
    lib = r["effective"]["mlx@float32"]["library"]
    assert lib["k_eq_v"] == [False, False, True, False, False, True] and lib["kv_heads_per_layer"][2] == 1


def test_layer_scalar_dropped_in_mlx_lm_is_located_and_named(tmp_path, monkeypatch):
    """mlx-lm's own DecoderLayer.__call__, recompiled from its source without the `h * self.layer_scalar` line."""
    from mlx_lm.models import gemma4_text

    src = textwrap.dedent(inspect.getsource(gemma4_text.DecoderLayer.__call__))
    assert "h = h * self.layer_scalar" in src
    ns: dict = {}
    exec(src.replace("h = h * self.layer_scalar", "pass"), vars(gemma4_text), ns)  # noqa: S102
    monkeypatch.setattr(gemma4_text.DecoderLayer, "__call__", ns["__call__"])
    code, r = report(tmp_path, "--spec", "tiny-gemma4")
    assert code == 1
    first = next(f["tap"] for f in r["first_divergences"] if f["mode"] == "cumulative")
    assert first == "layers.0.out"  # pre_scalar still agrees: the product is what is missing
    assert {d["cause"]: d["tap"] for d in r["diagnosis"]}.get("layer-scalar-missing") == "layers.0.out", \
        r["diagnosis"]


def test_what_mlx_lm_hard_codes_is_refused_by_field():
    from parity.adapters.mlx import MlxAdapter
    from parity.errors import Unsupported
    from parity.model.presets import resolve_spec

    spec = resolve_spec("tiny-gemma4")
    MlxAdapter().check(spec, "float32")
    with pytest.raises(Unsupported, match="layer_scalar=False"):
        MlxAdapter().check(spec.replace(layer_scalar=False), "float32")


def test_kv_source_is_observed_not_assumed():
    """A shared layer handed another layer's keys and values (mlx-lm's previous_kvs changed after the build)
    shows as that layer in kv_source, and its attention output changes with it."""
    import numpy as np

    from parity.adapters.mlx import MlxAdapter
    from parity.model.presets import resolve_spec
    from parity.model.weights import random_weights

    spec = resolve_spec("tiny-gemma4")
    a = MlxAdapter()
    m = a.build(spec, random_weights(spec), "float32")
    try:
        ids = list(range(3, 23))
        good = a.run(m, ids).taps
        assert m.kv_source == {"4": 2, "5": 3}
        m.model.model.previous_kvs[4] = 0  # a local layer of the same shapes, not the last before the split
        bad = a.run(m, ids).taps
        assert m.kv_source == {"4": 0, "5": 3}
        assert np.array_equal(good["layers.3.out"], bad["layers.3.out"])
        assert not np.allclose(good["layers.4.attn"], bad["layers.4.attn"], rtol=1e-3, atol=1e-3)
    finally:
        a.release(m)
