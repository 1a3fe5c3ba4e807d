"""The fault-injection suite: every known cause is detected, located at its first tap, and named.

Each fault is applied to a real implementation (transformers with one of its
modules patched, or the port with one field changed), in float32 and bfloat16.
A fault exempt in a dtype carries the measured reason, and the test checks
the exemption is true: the report passes there.
"""

import pytest

from tests.faults import FAULTS, detect

CASES = [(f, d) for f in FAULTS for d in ("float32", "bfloat16")]


@pytest.mark.parametrize("fault,dtype", CASES, ids=[f"{f.cause}-{f.name.replace(' ', '_')}-{d}" for f, d in CASES])
def test_fault_is_detected_located_named(fault, dtype):
    r = detect(fault, dtype)
    if dtype in fault.exempt:
        assert not r["detected"], f"{fault.name} is exempt in {dtype} ({fault.exempt[dtype]}) but was detected: {r}"
        return
    assert r["located"], f"{fault.name} {dtype}: first divergence at {r['first_tap']}, expected {fault.first_tap}"
    assert r["named"], f"{fault.name} {dtype}: named {r['named_as']}, expected {fault.cause}; {r['evidence']}"
    if fault.note_only:
        assert not r["detected"] and r["named_as"][0].endswith("(note)"), r
    else:
        assert r["detected"], f"{fault.name} {dtype}: the report passed"


def test_every_gemma1_cause_has_a_fault():
    import re
    from pathlib import Path

    catalogue = Path(__file__).resolve().parents[2] / "shared" / "DIVERGENCES.md"
    if not catalogue.exists():
        pytest.skip("shared/DIVERGENCES.md is not beside this checkout")
    ids = set(re.findall(r"^\| `([a-z0-9-]+)` \|", catalogue.read_text(), flags=re.M))
    assert {f.cause for f in FAULTS} == ids, ids ^ {f.cause for f in FAULTS}
