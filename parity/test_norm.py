"""Norm checks: placement (Gemma 1 pre-norm, Gemma 2/3 sandwich) and the (1 + w) RMSNorm."""

from parity.gate.checks import check_norm_placement, check_norm_unit_offset


def test_norm_placement(traces, spec):
    for t in traces:
        check_norm_placement(t, spec)


def test_norm_unit_offset_fp32(traces, spec, weights):
    for t in traces:
        check_norm_unit_offset(t, spec, weights)


def test_norm_taps_within_tolerance(results):
    from parity.gate.checks import check_within_tolerance

    for mode, rs in results.items():
        check_within_tolerance([r for r in rs if r.tap.endswith("norm")], f"{mode} norm taps beyond tolerance")
