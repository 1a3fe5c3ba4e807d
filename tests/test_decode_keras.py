"""keras-hub's own decode path (KerasAdapter.decode) against its full forward and the float64 port.

Each step's taps must equal the same position's row of keras-hub's full
forward pass (same library, same dtype: only the incremental path differs)
and the project's port in float64; its cache must hold every position the
step attends to, with the port's keys and values; local layers must mask the
cache to the window once positions run past it (the long prompt is 48 tokens,
the window 16, the decode runs to position 81).

One process runs one keras backend: JAX (the default) here, torch in one
subprocess for all its cases. XLA compiles every eager op once per shape and
dtype, which dominates the cost on CPU, so each case is decoded once and all
of its checks run in one test.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from parity.errors import BackendMissing, ParityInputError
from parity.model.presets import resolve_spec
from parity.model.prompts import default_prompts
from parity.model.taps import tap_names
from parity.model.weights import random_weights

SPECS = ("tiny-gemma", "tiny-gemma2", "tiny-gemma3")
CONTINUATION = [int(t) for t in np.random.default_rng(7).integers(3, 500, 34)]
ROOT = Path(__file__).resolve().parent.parent

# Tolerances, relative to the row's RMS (probabilities: absolute). float32: the decode and the full forward
# differ only in reduction order, measured <= 2e-5 x RMS at a tap, 9e-6 in a cached key or value and 1.4e-6 in
# a probability, against either reference. bfloat16 against the float64 port: one rounding is 2**-9 and errors
# grow through the layers, measured up to 0.26 x RMS at a tap (mlp.hidden, a product with heavy tails), 0.12 in
# a cached value, 0.021 in a probability. bfloat16 against its own full forward: bit-exact on torch; on JAX
# XLA's float32 softmax over [.., 1, slots] sums in another order than over [.., T, slots] (~1e-8), which now
# and then flips a bf16 rounding of a probability and grows from there: measured <= 2e-4 x RMS, except 0.116 on
# tiny-gemma3's long prompt (0.009 in a probability). A wrong position, window or cache slot is ~1 x RMS.
TOL = {
    "float32": {"own": 1e-4, "port": 1e-4, "cache": 1e-4, "probs_own": 1e-5, "probs_port": 1e-5},
    "bfloat16": {"own": 0.3, "port": 0.4, "cache": 0.25, "probs_own": 0.03, "probs_port": 0.05},
}


def rel_err(a, ref) -> float:
    """max |a - ref| over the RMS of ref, in float64."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.sqrt(np.mean(ref**2)))


def abs_err(a, ref) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(ref, np.float64)).max())


@dataclass
class Case:
    """One keras-hub decode and the references for the same tokens."""

    name: str
    dtype: str
    prompt: str
    backend: str
    decoded: object  # DecodeResult
    full: dict  # keras-hub's full forward over prompt + continuation, same model
    ref: dict  # the port's float64 full forward
    port_decoded: object  # the port's float64 DecodeResult

    @property
    def spec(self):
        return resolve_spec(self.name)

    @property
    def tokens(self) -> list[int]:
        return default_prompts(self.spec)[self.prompt]

    def label(self) -> str:
        return f"{self.backend} {self.name} {self.dtype} {self.prompt}"


_port_cache: dict = {}


def port_references(name: str, prompt: str):
    """The port's float64 full forward and decode over the same tokens (dtype- and backend-independent)."""
    if (name, prompt) not in _port_cache:
        from parity.adapters.litgpt_style import LitgptStyleAdapter

        spec = resolve_spec(name)
        port = LitgptStyleAdapter()
        model = port.build(spec, random_weights(spec, 0), "float64")
        tokens = default_prompts(spec)[prompt]
        _port_cache[name, prompt] = (port.run(model, tokens + CONTINUATION).taps,
                                     port.decode(model, tokens, CONTINUATION))
    return _port_cache[name, prompt]


def keras_decode(adapter, name: str, dtype: str, prompt: str):
    """keras-hub's decode and its full forward over the same tokens, on one built model."""
    spec = resolve_spec(name)
    model = adapter.build(spec, random_weights(spec, 0), dtype)
    try:
        tokens = default_prompts(spec)[prompt]
        return adapter.decode(model, tokens, CONTINUATION), adapter.run(model, tokens + CONTINUATION).taps
    finally:
        adapter.release(model)


def visible(spec, layer: int, p: int, keys: np.ndarray) -> np.ndarray:
    """Which absolute key positions the query at p must attend to (HF: 0 <= p - j < window)."""
    w = spec.window_for(layer)
    return (keys <= p) & ((p - keys < w) if w else True)


def check_case(c: Case) -> tuple[list[str], dict]:
    """Every way the case disagrees with its references (empty when it agrees), and the worst errors."""
    spec, tol, P = c.spec, TOL[c.dtype], len(c.tokens)
    bad: list[str] = []
    n, steps = spec.num_layers, c.decoded.steps
    probs = [f"layers.{i}.attn.probs" for i in range(n)]
    if len(steps) != len(CONTINUATION):
        return [f"{len(steps)} steps for {len(CONTINUATION)} tokens"], {}
    if set(c.decoded.unavailable) != {f"layers.{i}.attn.scores" for i in range(n)}:
        bad.append(f"unavailable: {sorted(c.decoded.unavailable)}")
    worst = {"own": (0.0, ""), "port": (0.0, ""), "cache": (0.0, ""), "probs_own": (0.0, ""),
             "probs_port": (0.0, "")}

    def note(kind: str, err: float, where: str) -> None:
        if err > worst[kind][0]:
            worst[kind] = (err, where)

    mean_port = {}
    for s, step in enumerate(steps):
        p = P + s
        slots = P + len(CONTINUATION)
        # (a) every canonical tap at the new position, against both references' row p
        for tap in tap_names(spec) + ["rope.cos"]:
            a = step.taps.get(tap)
            if a is None or a.shape != (1, *c.full[tap].shape[1:]) or a.dtype != np.float32:
                bad.append(f"step {s}: {tap} missing or shaped {None if a is None else (a.shape, a.dtype)}")
                continue
            note("own", rel_err(a, c.full[tap][p:p + 1]), f"step {s} {tap}")
            note("port", rel_err(a, c.ref[tap][p:p + 1]), f"step {s} {tap}")
            if tap in tap_names(spec):
                err = np.abs(np.asarray(a, np.float64) - c.ref[tap][p:p + 1]).mean()
                mean_port[tap] = max(mean_port.get(tap, 0.0), err / np.sqrt(np.mean(c.ref[tap][p] ** 2)))
        # attention over keras-hub's whole cache: [heads, 1, slots], key positions 0..slots-1
        port_step = c.port_decoded.steps[s]
        for i, tap in enumerate(probs):
            a, keys = step.taps[tap], step.key_positions.get(i)
            if a.shape != (spec.num_heads, 1, slots) or keys is None or not np.array_equal(keys, np.arange(slots)):
                bad.append(f"step {s}: {tap} shaped {a.shape}, key positions {keys}")
                continue
            # (c) the window: out-of-window and unwritten slots get exactly 0, every visible key some weight
            seen = visible(spec, i, p, keys)
            if a[..., ~seen].any() or not (a[..., seen] > 0).all():
                bad.append(f"step {s} (position {p}): {tap} attends outside "
                           f"{'window ' + str(spec.window_for(i)) if spec.window_for(i) else 'the causal range'}")
            note("probs_own", abs_err(a, c.full[tap][:, p:p + 1]), f"step {s} {tap}")
            port_keys = port_step.key_positions[i]  # the port's ring: slot order is its own
            note("probs_port", abs_err(a[..., port_keys], port_step.taps[tap]), f"step {s} {tap}")
            if not np.allclose(a.sum(-1), 1, atol=1e-5):
                bad.append(f"step {s}: {tap} rows sum to {a.sum(-1).ravel()}")
        # (b) the cache: every position the step must see, with the port's keys (after q/k norm and RoPE)
        for i in range(n):
            view, port_view = step.cache.get(i), port_step.cache[i]
            if view is None:
                bad.append(f"step {s}: no cache for layer {i}")
                continue
            need = np.arange(p + 1)[visible(spec, i, p, np.arange(p + 1))]
            have = {int(q): j for j, q in enumerate(view.positions)}
            lacking = [int(q) for q in need if int(q) not in have]
            if lacking:
                bad.append(f"step {s}: layer {i}'s cache lacks positions {lacking[:5]}")
                continue
            if view.k.shape != (spec.num_kv_heads, len(view.positions), spec.head_dim) or view.v.shape != view.k.shape:
                bad.append(f"step {s}: layer {i}'s cache k {view.k.shape}, v {view.v.shape}")
                continue
            for j, q in enumerate(port_view.positions):
                if int(q) in have:
                    for side in ("k", "v"):
                        mine, theirs = getattr(view, side)[:, have[int(q)]], getattr(port_view, side)[:, j]
                        note("cache", rel_err(mine, theirs), f"step {s} layer {i} {side} position {int(q)}")
    for kind, (err, where) in worst.items():
        if err > tol[kind]:
            bad.append(f"{kind}: max error {err:.3g} at {where} (allowed {tol[kind]:g})")
    if c.dtype == "bfloat16":  # really bf16, not a float32 computation labelled bf16
        if max(mean_port.values()) < 1e-4:
            bad.append(f"bf16 mean error only {max(mean_port.values()):.2g} x RMS: not computed in bf16")
    return bad, worst


# --------------------------------------------------------------- torch, in a subprocess
# GemmaBackbone (its stacked cache, its post-RoPE permutation, softcaps) and Gemma3Backbone (per-layer cache,
# q/k norms); Gemma 1 is GemmaBackbone with options off
TORCH_CASES = [(name, dtype, "long") for name in ("tiny-gemma2", "tiny-gemma3") for dtype in ("float32", "bfloat16")]


def torch_worker(path: str) -> None:
    """Run in a fresh process: keras-hub on torch decodes every TORCH_CASES case; the results are pickled."""
    from parity.adapters.keras_hub import KerasAdapter

    adapter = KerasAdapter(backend="torch")
    try:
        adapter.check(resolve_spec("tiny-gemma"), "float32")
    except BackendMissing as e:
        out = {"skip": str(e)}
    else:
        out = {case: keras_decode(adapter, *case) for case in TORCH_CASES}
        out["version"] = adapter.version()
    with open(path, "wb") as f:
        pickle.dump(out, f)


def test_torch_decode_agrees_with_full_forward_and_port(tmp_path):
    path = tmp_path / "torch.pkl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("KERAS_BACKEND", None)  # this process set it for JAX; the child's adapter sets torch
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_decode_keras import torch_worker; torch_worker(sys.argv[1])",
         str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(path, "rb") as f:
        out = pickle.load(f)
    if "skip" in out:
        pytest.skip(out["skip"])
    assert "/ torch " in out["version"]
    failures = []
    for name, dtype, prompt in TORCH_CASES:
        decoded, full = out[name, dtype, prompt]
        case = Case(name, dtype, prompt, "torch", decoded, full, *port_references(name, prompt))
        failures += [f"{case.label()}: {b}" for b in check_case(case)[0]]
    assert not failures, "; ".join(failures[:4])


# ------------------------------------------------------------------ JAX, in this process
@pytest.fixture(scope="module")
def adapter():
    from parity.adapters.keras_hub import KerasAdapter

    a = KerasAdapter()
    try:
        a.check(resolve_spec("tiny-gemma"), "float32")
    except (BackendMissing, ParityInputError) as e:  # not installed, or keras on another backend here
        pytest.skip(str(e))
    return a


@pytest.mark.parametrize("dtype, prompt", [("float32", "short"), ("float32", "long"),
                                           ("bfloat16", "short"), ("bfloat16", "long")])
def test_jax_decode_agrees_with_full_forward_and_port(adapter, dtype, prompt):
    # one test per shape and dtype, every spec in it: XLA's eager compiles are shared by the specs
    failures = []
    for name in SPECS:
        decoded, full = keras_decode(adapter, name, dtype, prompt)
        case = Case(name, dtype, prompt, "jax", decoded, full, *port_references(name, prompt))
        failures += [f"{case.label()}: {b}" for b in check_case(case)[0]]
    assert not failures, "; ".join(failures[:4])


def test_decode_refuses_bad_tokens(adapter):
    spec = resolve_spec("tiny-gemma")
    model = adapter.build(spec, random_weights(spec, 0), "float32")
    try:
        assert adapter.decodes
        with pytest.raises(ParityInputError, match="prompt"):
            adapter.decode(model, [], [5])
        with pytest.raises(ParityInputError, match="continuation"):
            adapter.decode(model, [2, 5], [5, spec.vocab_size])
    finally:
        adapter.release(model)
