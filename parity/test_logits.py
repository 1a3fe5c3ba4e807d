"""Logits checks: within tolerance, and the next-token distribution agrees (KL, top-1)."""

from parity.gate.checks import check_within_tolerance
from parity.numerics.tolerances import LOGITS_KL_MAX as KL_MAX


def test_logits_within_tolerance(results):
    for mode, rs in results.items():
        check_within_tolerance([r for r in rs if r.tap == "logits"], f"{mode} logits beyond tolerance")


def test_logits_distribution(results, impl_dtype):
    _, dtype = impl_dtype
    for r in results["cumulative"]:
        if r.tap == "logits":
            assert r.logits["kl_mean"] <= KL_MAX[dtype], (
                f"{r.impl}@{dtype} [{r.prompt}]: mean KL {r.logits['kl_mean']:.3g} > {KL_MAX[dtype]:.3g}; "
                f"top-1 agreement {r.logits['top1_agree']:.0%}"
            )
