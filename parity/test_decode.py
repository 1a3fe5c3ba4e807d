"""Decode checks (`pytest parity -k decode`): each implementation's own KV cache, step by step.

Per implementation and dtype: every decode step equals the float64 port's full
forward and the implementation's own full forward within honest noise, the
sliding window holds after the cache wraps, and what the cache holds matches
the keys and values each position must see.
"""

import pytest

from parity.gate.checks import check_within_tolerance
from parity.capture.decode import DECODE, SELF


def _runs(report, impl, dtype):
    got = {r.mode: r for r in report.verdict.runs if (r.impl, r.dtype) == (impl, dtype)}
    if DECODE not in got:
        why = report.skipped.get(f"{impl} (decode)", "no decode run in the report")
        pytest.skip(f"{impl}@{dtype} does not decode: {why}")
    return got


def test_decode_equals_the_full_forward(parity_decode_report, impl_dtype):
    impl, dtype = impl_dtype
    _runs(parity_decode_report, impl, dtype)
    for mode in (DECODE, SELF):
        results = parity_decode_report.run_results(impl, dtype, mode)
        assert results, f"{impl}@{dtype}: nothing was compared in {mode}"  # comparing nothing is never a pass
        check_within_tolerance([r for r in results if not r.waived], f"decode steps beyond honest noise ({mode})")


def test_decode_window_holds_past_the_wrap(parity_decode_report, impl_dtype):
    impl, dtype = impl_dtype
    _runs(parity_decode_report, impl, dtype)
    spec = parity_decode_report.spec
    window = spec.sliding_window
    if not window:
        pytest.skip(f"{spec.name} has no sliding window (run with --parity-spec tiny-gemma2 or tiny-gemma3)")
    prompts = parity_decode_report.prompts
    steps = len(parity_decode_report.continuation)
    wrapped = [p for p, ids in prompts.items() if len(ids) + steps > 2 * window]
    assert wrapped, (f"no prompt decodes past twice the window {window} ({steps} steps); raise --parity-decode")
    late = [r for r in parity_decode_report.run_results(impl, dtype, DECODE)
            if r.prompt in wrapped and r.steps is not None and not r.waived
            and any(x > r.bound for s, x in enumerate(r.steps) if len(prompts[r.prompt]) + s >= window)]
    assert not late, "; ".join(r.message() for r in late[:3])


def test_decode_cache_contents_match(parity_decode_report, impl_dtype):
    impl, dtype = impl_dtype
    _runs(parity_decode_report, impl, dtype)
    cache = [r for r in parity_decode_report.run_results(impl, dtype, DECODE) if ".cache." in r.tap]
    if not cache:
        reasons = sorted({why for t in parity_decode_report.traces if (t.impl, t.dtype, t.mode) == (impl, dtype, DECODE)
                          for tap, why in t.unavailable.items() if ".cache." in tap})
        pytest.skip(f"{impl}@{dtype} does not expose its cache: {'; '.join(reasons) or 'no cache taps'}")
    check_within_tolerance([r for r in cache if not r.waived],
                           "cache entries differ from the keys and values the positions wrote")
