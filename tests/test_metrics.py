import math

import numpy as np
import pytest

from parity.numerics.metrics import compare_arrays, logit_metrics, ulp_of


def test_identical_arrays_have_zero_error():
    a = np.linspace(-3, 3, 50)
    m = compare_arrays(a, a, "float32", atol=0.0, rtol=0.0)
    assert m["max_abs"] == 0 and m["mismatched"] == 0 and m["cosine"] == pytest.approx(1.0)


def test_errors_and_location():
    ref = np.array([[1.0, 2.0], [4.0, -8.0]])
    act = ref + np.array([[0.0, 0.0], [0.5, 0.0]])
    m = compare_arrays(act, ref, "float32", atol=0.1, rtol=0.0)
    assert m["max_abs"] == 0.5 and m["where"] == [1, 0]
    assert m["max_rel"] == pytest.approx(0.125)
    assert m["mismatched"] == 1 and m["mismatch_fraction"] == 0.25
    assert m["needed_atol"] == pytest.approx(0.5)  # the atol that would have passed


def test_rtol_scales_with_reference():
    ref = np.array([100.0, 0.001])
    act = ref * (1 + 1e-3)
    assert compare_arrays(act, ref, "float32", atol=0.0, rtol=2e-3)["mismatched"] == 0
    assert compare_arrays(act, ref, "float32", atol=0.0, rtol=5e-4)["mismatched"] == 2


def test_nan_is_never_within_tolerance():
    m = compare_arrays(np.array([1.0, np.nan]), np.array([1.0, 1.0]), "float32", atol=1e9, rtol=1e9)
    assert not m["finite"] and m["mismatched"] == 1


@pytest.mark.parametrize("dtype,bits", [("float32", 23), ("bfloat16", 7), ("float16", 10), ("float64", 52)])
def test_ulp_at_one(dtype, bits):
    assert ulp_of(np.array([1.0, 1.5, -1.9]), dtype).tolist() == [2.0**-bits] * 3


def test_ulp_distance_counts_bf16_steps():
    ref = np.array([1.0])
    m = compare_arrays(ref + 3 * 2.0**-7, ref, "bfloat16", atol=0, rtol=0)
    assert m["max_ulp"] == 3


def test_logit_metrics():
    ref = np.array([[5.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.0]])
    same = logit_metrics(ref, ref, k=2)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-15) and same["top1_agree"] == 1.0
    flipped = logit_metrics(ref[:, ::-1].copy(), ref, k=2)
    assert flipped["top1_agree"] == 0.0 and flipped["kl_mean"] > 1.0
    assert math.isfinite(flipped["kl_max"])
