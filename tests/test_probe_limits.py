"""Probes conclude only from what the dtype can carry.

Trained-model statistics (an attention sink, gate inputs far below zero, norm
weights near -1) push values below what bf16/fp16 represent. Every trace here
is built from real computations (torch's softmax, GELU and RMSNorm in the
dtype, or the lit-gpt-style port itself), and the probes must either decide
correctly or say "cannot tell", never name a cause from an underflow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from parity.model.presets import PRESETS
from parity.diagnose.probes._evidence import MIN_TRUSTED, agreement
from parity.diagnose.probes.attention import probe_attention_mask, probe_softmax
from parity.diagnose.probes.mlp import gelu_exact, gelu_tanh, probe_geglu, probe_gelu
from parity.diagnose.probes.norms import probe_rmsnorm
from parity.capture.trace import Trace


def _torch_dtype(dtype: str):
    import torch  # here, not at import: collecting the suite imports no framework

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


GEMMA2 = PRESETS["tiny-gemma2"]  # layer 0 local (window 16), layer 1 global
HEADS, T = 4, 48


def _trace(dtype: str, taps: dict) -> Trace:
    return Trace(impl="real-formulas", version="0", dtype=dtype, spec={}, weights_hash="", tokens=list(range(T)),
                 taps={k: np.asarray(v, np.float32) for k, v in taps.items()})


def _ftz(a: torch.Tensor) -> torch.Tensor:
    """What flush-to-zero hardware returns: subnormal results become 0."""
    import torch

    return torch.where(a.abs() < torch.finfo(a.dtype).tiny, torch.zeros_like(a), a)


# ------------------------------------------------------------------ attention mask
def _sink_scores(seed: int = 0) -> np.ndarray:
    """[heads, T, T] scores with an attention sink on key 1 (+24) and the BOS key scoring far below (-8).

    Every other key ends up about e^-24 (4e-11) below the sink: visible, but under
    fp16's smallest subnormal (6e-8), so its probability reads 0 in fp16.
    """
    s = np.random.default_rng(seed).normal(size=(HEADS, T, T))
    s[:, :, 1] += 24.0
    s[:, :, 0] -= 8.0
    return s


def _attention(scores: np.ndarray, window: int | None, dtype: str, with_scores: bool) -> Trace:
    """The port's attention arithmetic: scores + additive mask in the dtype, softmax in fp32, cast back."""
    import torch

    from parity.adapters.port_model import causal_mask

    t = _torch_dtype(dtype)
    s = torch.tensor(scores, dtype=t) + causal_mask(T, window, t)
    p = torch.softmax(s.float(), dim=-1).to(t)
    taps = {}
    for layer in (0, 1):
        if with_scores:
            taps[f"layers.{layer}.attn.scores"] = s.float().numpy()
        taps[f"layers.{layer}.attn.probs"] = p.float().numpy()
    return _trace(dtype, taps)


def test_the_sink_case_really_underflows_in_fp16():
    """The premise: in fp16 the farthest key reads 0 in every head although it is visible."""
    s = _sink_scores()
    p16 = np.asarray(_attention(s, None, "float16", False).taps["layers.1.attn.probs"], np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    p64 = e / e.sum(-1, keepdims=True)  # the same rows in float64, causal
    assert (p16[:, -1, 0] == 0).all() and (p64[:, -1, 0] > 1e-20).all()
    i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    widest = int(np.max(np.where(p16 != 0, i - j + 1, 0)))
    assert widest == T - 1  # what the zero pattern alone reads as: a window of T - 1 on a global layer


def test_mask_probe_on_a_correct_fp16_sink_is_not_a_window():
    s = _sink_scores()
    # probabilities only (HF, keras-hub): the zeros may be underflow, so no conclusion
    p = probe_attention_mask(_attention(s, None, "float16", with_scores=False), GEMMA2, 1)
    assert p.status == "cannot-tell", p.sentence()
    # with the scores exposed (the port): the -inf pattern is the mask, whatever underflows
    p = probe_attention_mask(_attention(s, None, "float16", with_scores=True), GEMMA2, 1)
    assert p.cause is None and p.verdict == "mask is global, causal", p.sentence()
    assert p.evidence["read from"].startswith("scores")
    # the local layer with the same sink: right window, nothing named
    for with_scores in (False, True):
        p = probe_attention_mask(_attention(s, 16, "float16", with_scores), GEMMA2, 0)
        assert p.cause is None, p.sentence()
    # bf16 carries these probabilities: read straight off the probabilities
    p = probe_attention_mask(_attention(s, None, "bfloat16", with_scores=False), GEMMA2, 1)
    assert p.cause is None and p.verdict == "mask is global, causal", p.sentence()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("with_scores", [True, False], ids=["scores", "probs-only"])
@pytest.mark.parametrize("layer,window,why", [
    (1, 40, "a global layer made local"),
    (0, 15, "window one too narrow"),
    (0, 17, "window one too wide"),
    (0, None, "a local layer made global"),
])
def test_mask_probe_still_names_a_wrong_window_with_the_same_sink(dtype, with_scores, layer, window, why):
    p = probe_attention_mask(_attention(_sink_scores(), window, dtype, with_scores), GEMMA2, layer)
    assert p.cause == "sliding-window", f"{why}: {p.sentence()}"


def test_mask_probe_on_the_real_port_in_fp16_probabilities_only():
    """The port itself, right and with a window one too narrow, its scores tap withheld as HF withholds it."""
    from parity.adapters.litgpt_style import LitgptStyleAdapter
    from parity.harness import Request, run
    from parity.adapters.port_model import PortOptions
    from parity.model.prompts import default_prompts

    narrow = LitgptStyleAdapter(PortOptions(), {"sliding_window": 15}, name="window-15")
    report = run(Request(spec=GEMMA2, impls=["litgpt-style", "window-15"], dtypes=["float16"],
                         adapters={"window-15": narrow}, prompts={"long": default_prompts(GEMMA2)["long"]}))
    traces = {t.impl: t for t in report.traces if t.dtype == "float16"}
    for impl, cause in (("litgpt-style", None), ("window-15", "sliding-window")):
        t = traces[impl]
        for taps in (t.taps, {k: v for k, v in t.taps.items() if not k.endswith("attn.scores")}):
            p = probe_attention_mask(dataclasses.replace(t, taps=taps), GEMMA2, 0)
            assert p.cause == cause, f"{impl}: {p.sentence()}"
            if cause is None:
                assert p.verdict == "mask is local, window 16", p.sentence()  # random weights: decidable


# ------------------------------------------------------------------ GELU
def _gelu_trace(x: np.ndarray, dtype: str, approximate: str) -> tuple[Trace, np.ndarray]:
    import torch

    xt = torch.tensor(x).to(_torch_dtype(dtype))
    y = torch.nn.functional.gelu(xt, approximate=approximate)
    x_in = xt.float().numpy().astype(np.float64)
    return _trace(dtype, {"layers.0.mlp.gate": x_in, "layers.0.mlp.act": y.float().numpy()}), x_in


def _tail_heavy_gate(n_rows: int = 64, share_below: float = 0.45, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = n_rows * 64
    below = int(n * share_below)
    x = np.concatenate([rng.normal(0.0, 1.5, n - below), rng.uniform(-9.0, -4.0, below)])
    return rng.permutation(x).reshape(n_rows, 64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gelu_probe_names_exact_gelu_with_many_inputs_below_minus_4(dtype):
    trace, x = _gelu_trace(_tail_heavy_gate(), dtype, "none")
    y = trace.taps["layers.0.mlp.act"]
    # the premise: counted over every element, even the right formula misses the 98% bar
    assert agreement(y, gelu_exact(x), dtype) < 0.98
    p = probe_gelu(trace, 0)
    assert p.cause == "gelu-exact", p.sentence()
    assert p.evidence["excluded"] >= int(0.45 * x.size)  # every input below -4 is left out, and counted
    assert p.evidence["trusted"] + p.evidence["excluded"] == x.size
    assert "cancels" in p.evidence["excluded because"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gelu_probe_does_not_flag_tanh_with_many_inputs_below_minus_4(dtype):
    trace, x = _gelu_trace(_tail_heavy_gate(seed=1), dtype, "tanh")
    assert agreement(trace.taps["layers.0.mlp.act"], gelu_tanh(x), dtype) < 0.98  # the premise
    p = probe_gelu(trace, 0)
    assert p.cause is None and p.verdict == "GELU is tanh, rounded once", p.sentence()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_probe_judges_against_the_specs_gelu(dtype):
    """A spec asking for the exact GELU (gelu_approximate="none"): the exact form is correct there, and tanh is
    the divergence `gelu-tanh`; the probe once named gelu-exact whatever the spec said (a false alarm on mlx's
    Gemma 1, which runs the exact form)."""
    x = np.random.default_rng(3).normal(0.0, 2.0, size=(64, 64))
    exact, _ = _gelu_trace(x, dtype, "none")
    tanh_, _ = _gelu_trace(x, dtype, "tanh")
    assert probe_gelu(exact, 0, approximate="none").cause is None
    assert probe_gelu(tanh_, 0, approximate="none").cause == "gelu-tanh"
    assert probe_gelu(exact, 0).cause == "gelu-exact"  # the default spec (tanh), as before
    assert probe_gelu(tanh_, 0).cause is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gelu_probe_cannot_tell_with_too_few_trustworthy_elements(dtype):
    rng = np.random.default_rng(2)
    x = rng.uniform(-9.0, -4.0, size=(64, 64))
    x[0, :MIN_TRUSTED // 2] = rng.normal(size=MIN_TRUSTED // 2)  # a few inputs where GELU is trustworthy
    for approximate in ("none", "tanh"):
        p = probe_gelu(_gelu_trace(x, dtype, approximate)[0], 0)
        assert p.status == "cannot-tell", p.sentence()
        assert p.evidence["trusted"] < MIN_TRUSTED


def test_a_small_tensor_with_an_element_left_out_is_still_decided():
    """2 tokens of 8 channels (what hypothesis draws), one gate so small that its GELU is an fp16 subnormal."""
    x = np.random.default_rng(6).normal(size=(2, 8))
    x[0, 0] = 1e-5
    p = probe_gelu(_gelu_trace(x, "float16", "tanh")[0], 0)
    assert p.evidence["excluded"] == 1 and p.cause is None and p.status == "ok", p.sentence()


def test_geglu_probe_leaves_out_subnormal_products_in_fp16():
    """gelu(gate) * up with the gate deep in GELU's tail: many products fall below fp16's smallest normal."""
    import torch

    rng = np.random.default_rng(3)
    gate = torch.tensor(_tail_heavy_gate(seed=3)).half()
    up = torch.tensor(rng.normal(0.0, 0.3, size=gate.shape)).half()
    act = torch.nn.functional.gelu(gate, approximate="tanh")
    for name, hidden in (("keeps subnormals", act * up), ("flushes them to zero", _ftz(act * up))):
        taps = {"layers.0.mlp.gate": gate, "layers.0.mlp.up": up, "layers.0.mlp.act": act,
                "layers.0.mlp.hidden": hidden}
        trace = _trace("float16", {k: v.float().numpy() for k, v in taps.items()})
        p = probe_geglu(trace, PRESETS["tiny-gemma"].replace(intermediate_size=64), 0)
        assert p.cause is None and p.verdict == "mlp.hidden = act * up", f"{name}: {p.sentence()}"
        assert p.evidence["excluded"] > 100, p.sentence()


# ------------------------------------------------------------------ RMSNorm and softmax
def _gemma_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Gemma's RMSNorm: normalise in fp32, multiply by (1 + w) in fp32, cast after."""
    import torch

    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def test_rmsnorm_probe_with_norm_weights_near_minus_one_in_fp16():
    """(1 + w) ~ 2^-8 (w = -0.99609375, the bf16 weight nearest -1) on half the channels, and a massive
    activation on the BOS rows: there the other channels normalise to ~1e-3 and their outputs fall below
    fp16's smallest normal (6.1e-5)."""
    import torch

    spec = PRESETS["tiny-gemma"]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, spec.hidden_size))
    x[:8, 0] = 3000.0  # the massive activation, on every BOS-like row
    x = torch.tensor(x).half()
    w = rng.normal(0.0, 0.5, spec.hidden_size)
    w[1::2] = -1.0 + 2.0**-8
    w = torch.tensor(w).to(torch.bfloat16)  # weights are stored bf16-representable
    for name, y in (("keeps subnormals", _gemma_rmsnorm(x, w, spec.norm_eps)),
                    ("flushes them to zero", _ftz(_gemma_rmsnorm(x, w, spec.norm_eps)))):
        trace = _trace("float16", {"x": x.float().numpy(), "n": y.float().numpy()})
        p = probe_rmsnorm(trace, spec, {"n.weight": w.float().numpy()}, "n", trace.taps["x"], "n.weight")
        assert p.cause is None and p.verdict.startswith("RMSNorm is (1 + w)"), f"{name}: {p.sentence()}"
        assert p.evidence["excluded"] >= 8 * spec.hidden_size // 4, p.sentence()
    # every row massive, every channel but the massive one at (1 + w) = 2^-8: too little left to decide on
    x_all = x.clone()
    x_all[:, 0] = 3000.0
    w_all = torch.full((spec.hidden_size,), -1.0 + 2.0**-8).to(torch.bfloat16)
    trace = _trace("float16", {"x": x_all.float().numpy(),
                               "n": _ftz(_gemma_rmsnorm(x_all, w_all, spec.norm_eps)).float().numpy()})
    p = probe_rmsnorm(trace, spec, {"n.weight": w_all.float().numpy()}, "n", trace.taps["x"], "n.weight")
    assert p.status == "cannot-tell", p.sentence()


def test_softmax_probe_with_a_sink_in_fp16():
    """A milder sink (+12) leaves many probabilities in fp16's subnormal range: they are left out."""
    import torch

    from parity.adapters.port_model import causal_mask

    s = np.random.default_rng(5).normal(size=(HEADS, T, T))
    s[:, :, 0] += 12.0
    scores = torch.tensor(s).half() + causal_mask(T, None, torch.float16)
    probs = torch.softmax(scores.float(), dim=-1).half()
    for name, p_tap in (("keeps subnormals", probs), ("flushes them to zero", _ftz(probs))):
        trace = _trace("float16", {"layers.0.attn.scores": scores.float().numpy(),
                                   "layers.0.attn.probs": p_tap.float().numpy()})
        p = probe_softmax(trace, 0)
        assert p.cause is None and p.verdict == "softmax fp32, rounded once", f"{name}: {p.sentence()}"
        assert p.evidence["excluded"] > 100, p.sentence()
