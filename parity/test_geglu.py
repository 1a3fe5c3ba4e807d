"""GeGLU checks: mlp.hidden = gelu(gate) * up, two half-width projections."""

from parity.gate.checks import check_geglu, check_within_tolerance


def test_geglu_gate_times_up_half_width(traces, spec):
    for t in traces:
        check_geglu(t, spec)


def test_geglu_taps_within_tolerance(results):
    for mode, rs in results.items():
        check_within_tolerance([r for r in rs if ".mlp" in r.tap], f"{mode} MLP taps beyond tolerance")
