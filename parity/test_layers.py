"""Whole-trace checks: every tap in both modes, the embedding scale, and no named divergence."""

from parity.gate.checks import check_embedding_scale, check_within_tolerance


def test_layers_cumulative_within_tolerance(results):
    check_within_tolerance(results["cumulative"], "cumulative taps beyond tolerance")


def test_layers_isolated_within_tolerance(results):
    check_within_tolerance(results["isolated"], "isolated (local) taps beyond tolerance")


def test_embedding_scale(traces, spec, weights):
    for t in traces:
        check_embedding_scale(t, spec, weights)


def test_no_named_divergence(parity_report, impl_dtype):
    impl, dtype = impl_dtype
    found = [d for d in parity_report.divergent_causes if (d.impl, d.dtype) == (impl, dtype)]
    assert not found, "; ".join(f"{d.cause} at {d.tap}: {d.evidence}" for d in found)
