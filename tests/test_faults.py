"""The fault-injection suite: every known cause is detected, located at its first tap, and named.

Each fault is applied to a real implementation (transformers with one of its
modules patched, or the port with one field changed), in float32 and bfloat16.
A fault exempt in a dtype carries the measured reason, and the test checks
the exemption is true: the report passes there.
"""

import pytest

from tests.faults import DECODE_FAULTS, FAULTS, detect

PROFILES = ("default", "trained-like")
# Gemma 4 faults: the default profile only (Fault.profiles; the MoE block sets none of its own)
CASES = [(f, d, p) for p in PROFILES for f in FAULTS for d in ("float32", "bfloat16")
         if p in f.profiles and (p == "default" or f.spec != "tiny-gemma4-moe")]


@pytest.mark.parametrize("fault,dtype,profile", CASES,
                         ids=[f"{f.cause}-{f.name.replace(' ', '_')}-{d}-{p}" for f, d, p in CASES])
def test_fault_is_detected_located_named(fault, dtype, profile):
    r = detect(fault, dtype, profile)
    if dtype in fault.exempt:
        assert not r["detected"], f"{fault.name} is exempt in {dtype} ({fault.exempt[dtype]}) but was detected: {r}"
        return
    assert r["located"], f"{fault.name} {dtype}: first divergence at {r['first_tap']}, expected {fault.tap_in(dtype)}"
    assert r["named"], f"{fault.name} {dtype}: named {r['named_as']}, expected {fault.cause}; {r['evidence']}"
    if fault.note_only:
        assert not r["detected"] and r["named_as"][0].endswith("(note)"), r
    else:
        assert r["detected"], f"{fault.name} {dtype}: the report passed"


def test_every_gemma1_cause_has_a_fault():
    from parity.diagnose.causes import CAUSE_IDS, CAUSES

    # catalogue ids that upcoming work will inject, with no fault in tests/faults.py yet: take an id out
    # of this set when its fault lands (the assertion below fails until it is taken out)
    NOT_YET_INJECTED: set[str] = set()
    injected = {f.cause for f in FAULTS} | {f.cause for f in DECODE_FAULTS}  # decode causes: tests/test_decode.py
    # issue 20's runtime causes: injected into mlx-lm (or the port's decode cache) by tests/test_runtime_causes.py
    injected |= {"rope-wrong-layer-type", "config-value-dropped", "fp16-overflow", "kv-cache-precision"}
    # a precision choice of ggml's own kernel, shown on llama.cpp itself (tests/test_llama_cpp.py, F32 cache)
    injected |= {"gelu-fp16-table"}
    assert injected <= CAUSE_IDS, f"faults name ids not in parity/diagnose/causes.py: {sorted(injected - CAUSE_IDS)}"
    assert NOT_YET_INJECTED <= CAUSE_IDS, sorted(NOT_YET_INJECTED - CAUSE_IDS)
    assert not NOT_YET_INJECTED & injected, \
        f"these now have a fault: remove them from NOT_YET_INJECTED: {sorted(NOT_YET_INJECTED & injected)}"
    # every cause but the verdicts ("unexplained", "honest-rounding") needs a fault
    wanted = {c.id for c in CAUSES if c.kind != "verdict"} - NOT_YET_INJECTED
    assert wanted <= injected, f"causes with no fault in tests/faults.py: {sorted(wanted - injected)}"


def test_raw_logits_make_a_centred_unembedding_a_divergence():
    """By default logits are compared up to a constant per position (logit-shift is a note); --raw-logits asks
    for the values themselves, and then the shift is the first divergence, explained by logit-shift."""
    from parity.harness import Request, run
    from parity.model.presets import PRESETS
    from tests.faults import FAULTS

    (fault,) = [f for f in FAULTS if f.cause == "logit-shift"]
    adapter = fault.factory()
    spec = PRESETS[fault.spec]
    kw = dict(spec=spec, impls=[adapter.name], dtypes=["float32"], adapters={adapter.name: adapter},
              prompts={"p": [2, 17, 301, 5, 88, 260, 9, 140]})
    assert run(Request(**kw)).passed
    rep = run(Request(**kw, raw_logits=True))
    (rv,) = rep.verdict.runs
    assert rv.status == "FAIL" and rv.first.tap == "logits" and rv.explanation.cause == "logit-shift"
    assert rv.explanation.severity == "divergence"
