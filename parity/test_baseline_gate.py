"""The baseline gate: no tap's error grows beyond the stored baseline, and no new divergence appears.

The baseline (`fixtures/baseline.json`, or --parity-baseline) is a reduced
report: per run, prompt and tap, max |actual - ref| / rms(ref). A tap regresses
when its error now exceeds max(2 x baseline, baseline + 0.05 x its tolerance);
a tap or cause that passed in the baseline and fails now is a new divergence.
Improvements pass and are listed. Rewrite the baseline with
`pytest parity --parity-update-baseline` (that run fails, so the diff is reviewed).
"""

import pytest


def test_baseline_gate(parity_baseline, record_property):
    gate = parity_baseline()
    record_property("parity_baseline", gate.message())
    if not gate.passed:
        pytest.fail(gate.message(), pytrace=False)
    print(gate.message())  # the improvements, in the captured output; the terminal summary shows them too
