"""GELU checks: the tanh approximation, read from each implementation's own gate and act."""

from parity.gate.checks import check_gelu_tanh, check_within_tolerance


def test_gelu_is_tanh_approximation(traces, spec):
    for t in traces:
        check_gelu_tanh(t, spec)


def test_gelu_act_within_tolerance(results):
    for mode, rs in results.items():
        check_within_tolerance([r for r in rs if r.tap.endswith("mlp.act")], f"{mode} mlp.act beyond tolerance")
