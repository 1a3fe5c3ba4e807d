"""Quantized runs (issue 20): judged against the float64 port on the weights they hold, the loss reported apart.

The implementation here is a plug-in: the project's port computing in float32 on q8_0-quantized weights (blocks
of 32 along each matrix's input dimension, float16 scales, as llama.cpp's q8_0) with its activations rounded to
q8_0 before every projection, as ggml's q8_0 matmul does. It is a correct quantized Gemma, so it must PASS
against the reference on its held weights while its quantization loss is reported; the same plug-in with a
fault must still fail, at the right tap, named. The runtimes' own tests (llama.cpp, onnxruntime-genai) run the
same path on real quantized kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity.adapters.base import Held
from parity.harness import Request, run
from parity.model.presets import PRESETS
from parity.model.weights import Weights


def q8_0(a: np.ndarray) -> np.ndarray:
    """A 2-D weight [out, in] through q8_0 and back: per block of 32 inputs, d = max|w| / 127 in float16."""
    if a.ndim != 2 or a.shape[1] % 32:
        return a
    b = a.astype(np.float32).reshape(a.shape[0], -1, 32)  # [out, in / 32, 32]
    d = np.abs(b).max(-1, keepdims=True) / 127
    q = np.round(np.divide(b, d, out=np.zeros_like(b), where=d > 0))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(a.shape)


def quantized(weights: Weights) -> Weights:
    return Weights(weights.spec, {k: q8_0(np.asarray(v)) if "norm" not in k else np.asarray(v)
                                  for k, v in weights.tensors.items()}, source=f"q8_0 of {weights.source}")


def QuantizedPort(name="qport", unheld=False, **faults):
    """A plug-in quantized Gemma: the port in float32 on q8_0 weights, q8_0 activations in every matmul; with
    `unheld`, the same model not saying what it holds (judged against the float weights' reference). Made here,
    not at import: the port imports torch, and collecting the suite imports no framework."""
    from parity.adapters.litgpt_style import LitgptStyleAdapter
    from parity.adapters.port_model import PortOptions

    class Port(LitgptStyleAdapter):
        def held(self, spec, weights, dtype):
            return None if unheld else Held(quantized(weights), "q8_0", "q8_0")

        def settings(self):
            return {"weights": "q8_0"}

        def build(self, spec, weights, dtype):
            return super().build(spec, quantized(weights), dtype)

    return Port(PortOptions(act_quant="q8_0", **faults), name=name)


def _run(adapter, spec="tiny-gemma2", **kw):
    return run(Request(spec=PRESETS[spec], impls=[adapter.name], adapters={adapter.name: adapter},
                       dtypes=["float32"], **kw))


@pytest.fixture(scope="module")
def correct():
    return _run(QuantizedPort())


def test_a_correct_quantized_implementation_passes_against_its_held_weights(correct):
    assert correct.passed, correct.verdict.headline
    assert "qport@float32" in correct.held
    run0 = correct.runs[0]
    assert run0.settings["weights"] == "q8_0" and run0.settings["activations"] == "q8_0"
    (loss,) = correct.quant
    assert loss.weight_type == "q8_0" and loss.positions > 0
    assert 0 < loss.kl_mean < 1e-2 and loss.top1 > 0.8, loss.text()
    assert loss.within and loss.layers


def Unheld():
    return QuantizedPort(unheld=True)


def test_without_its_held_weights_the_same_correct_run_fails():
    """What the held reference is for: at float32's strictness the q8_0 model is not the float model."""
    plain = _run(Unheld())
    assert not plain.passed and not plain.held and not plain.quant


def test_a_fault_in_a_quantized_implementation_is_found_and_named():
    bad = _run(QuantizedPort(geglu_swapped=True))
    assert not bad.passed
    lead = bad.verdict.lead
    assert lead.first.tap.endswith(("mlp.hidden", "mlp.act")), lead.first.tap
    assert lead.explanation.cause == "geglu-swapped", bad.verdict.headline


def test_a_budget_below_the_loss_fails_the_gate_as_quantization_not_divergence():
    tight = _run(QuantizedPort(), quant_budget=1e-9)
    (loss,) = tight.quant
    assert not loss.within
    assert not tight.passed and "quantization loss" in tight.verdict.headline
    assert not tight.divergent_causes  # over budget is not a cause


def test_a_budget_with_no_quantizing_builtin_is_refused_before_any_work():
    from parity.errors import ParityInputError

    with pytest.raises(ParityInputError, match="none of the implementations run quantizes"):
        run(Request(spec=PRESETS["tiny-gemma"], impls=["litgpt-style"], dtypes=["float32"], quant_budget=0.01,
                    weights=_poisoned()))


def _poisoned():
    """Weights whose check() fails loudly: a refusal that comes after any weight is touched would show it."""
    class Poisoned:
        spec = PRESETS["tiny-gemma"]

        def check(self):
            raise AssertionError("the weights were used before the refusal")

    return Poisoned()


def test_a_budget_with_a_plugin_that_holds_nothing_reports_no_loss():
    """A plug-in may quantize (Adapter.held) or not: not known before it is asked, so not refused; it holds the
    given weights, so there is nothing to report."""
    got = _run(Unheld(), quant_budget=0.01)
    assert not got.quant and not got.held


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "q4_0=", "q4_0=1,q4_0=2", "q9_9=1", "x"])
def test_bad_budgets_are_refused_in_one_line(text):
    from parity.compare.quant import parse_budget
    from parity.errors import ParityInputError

    with pytest.raises(ParityInputError, match="quant_budget"):
        parse_budget(text)


def test_budgets_parse():
    from parity.compare.quant import parse_budget

    assert parse_budget("0.01") == 0.01
    assert parse_budget("q4_0=0.05, q8_0=0.002") == {"q4_0": 0.05, "q8_0": 0.002}


def qport():
    """`module:factory` for a capture in another process."""
    return QuantizedPort()


def test_in_separate_processes_each_reference_keeps_its_own_traces(tmp_path):
    """At real sizes every run is captured in its own process and its traces are files: the reference on held
    weights is the same implementation, dtype and mode as the ordinary reference, and once overwrote its files
    (a q8_0 run then judged against the float reference failed at embed by 7e3x its bound, and the float runs
    against the held one). Each held set's files now go in their own folder."""
    got = run(Request(spec=PRESETS["tiny-gemma2"], impls=["litgpt-style", f"{__name__}:qport"], dtypes=["float32"],
                      separate_processes=True, trace_dir=str(tmp_path), noise_members=1))
    assert got.passed, got.verdict.headline
    assert {r.impl for r in got.runs} == {"litgpt-style", "qport"} and len(got.quant) == 1
    assert any(p.name.startswith("held-") for p in tmp_path.iterdir())
