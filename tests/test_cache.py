"""The trace cache (parity.capture.cache): bounded, never handing out a trace that can be edited through it, not
used where the reference is replaced, and changing no fault-table outcome (shown failing on a wrong entry)."""

import numpy as np
import pytest


def _trace(name: str, n: int = 1024, **kw):
    from parity.capture.trace import Trace

    return Trace(impl=name, version="v", dtype="float32", spec={}, weights_hash="h", tokens=[1, 2],
                 taps={"embed": np.ones(n, np.float32)}, effective={"gelu": {"form": "tanh"}}, **kw)


def test_least_recently_used_dropped_past_the_byte_bound():
    from parity.capture.cache import TraceCache

    c = TraceCache(max_bytes=3 * 4096)  # three traces of 1024 float32
    for k in "abc":
        c.traces(k, lambda k=k: [_trace(k)])
    c.traces("a", lambda: pytest.fail("'a' is stored"))  # a hit: 'a' becomes the most recently used
    c.traces("d", lambda: [_trace("d")])
    assert c.keys() == ["c", "a", "d"] and c.bytes == 3 * 4096 and c.evicted == 1
    assert (c.hits, c.misses) == (1, 4)
    c.traces("big", lambda: [_trace("big", n=4 * 1024)])  # larger than the whole cache: not stored
    assert "big" not in c and len(c) == 3
    with pytest.raises(ValueError, match="max_bytes=-1"):
        TraceCache(max_bytes=-1)


def test_a_cached_trace_cannot_be_edited_through_the_cache():
    from parity.capture.cache import TraceCache

    c = TraceCache()
    first = c.traces("k", lambda: [_trace("a")])[0]
    with pytest.raises(ValueError, match="read-only"):
        first.taps["embed"][0] = 5.0  # in place: refused
    first.taps["extra"] = np.zeros(2)  # the caller's own dicts and fields
    first.effective["gelu"]["form"] = "erf"
    first.spec = {"edited": True}
    again = c.traces("k", lambda: pytest.fail("stored"))[0]
    assert list(again.taps) == ["embed"] and again.effective == {"gelu": {"form": "tanh"}} and again.spec == {}
    assert float(again.taps["embed"][0]) == 1.0


def test_values_and_none_are_stored_and_copied():
    from parity.capture.cache import TraceCache

    c = TraceCache()
    made = []
    assert c.value("none", lambda: made.append(1), copy_of=lambda v: v) is None
    assert c.value("none", lambda: made.append(1), copy_of=lambda v: v) is None and made == [1]  # None is a value
    got = c.value("d", lambda: {"x": 1}, copy_of=dict)
    got["x"] = 2
    assert c.value("d", dict, copy_of=dict) == {"x": 1}


def test_lazy_traces_from_files_are_never_stored(tmp_path):
    from parity.capture.cache import TraceCache
    from parity.capture.trace import load_trace

    path = _trace("a").save(tmp_path / "a.safetensors")
    c = TraceCache()
    lazy = c.traces("k", lambda: [load_trace(path, lazy=True)])
    assert len(c) == 0 and lazy[0].taps["embed"].shape == (1024,)


def test_not_used_for_a_reference_replaced_by_the_request():
    """A test or plug-in that replaces the port (the reference) with its own adapter: its traces are not the
    registry port's, so they are neither stored nor read (the counterfactual captures, the correct port's, are)."""
    from parity.capture.cache import TraceCache
    from parity.harness import PORT, Request, run
    from parity.model.presets import PRESETS
    from tests.faults import port

    spec = PRESETS["tiny-gemma"]
    prompts = {"p": [2, 17, 301, 5, 88, 260, 9, 140]}
    faulty = port(PORT, {"gelu_lowp": True})()  # named as the port: the reference itself is replaced
    c = TraceCache()
    run(Request(spec=spec, impls=[PORT], dtypes=["bfloat16"], adapters={PORT: faulty}, prompts=prompts, cache=c))
    assert not [k for k in c.keys() if k[0] in ("reference", "noise")], c.keys()
    run(Request(spec=spec, impls=[PORT], dtypes=["bfloat16"], prompts=prompts, cache=c))
    assert {k[0] for k in c.keys()} >= {"reference", "noise"}


# three prefill faults (two named by a probe, one by the counterfactual search) and a decode fault: the cache
# shares their reference and noise model, and the search's captures with the second search on the same model
PREFILL = ("hf exact GELU", "port exact GELU", "interleaved rope", "rope base 20000")
DECODE = "port ring written one slot late"


def test_the_fault_table_gives_the_same_results_with_and_without_the_cache():
    from parity.capture.cache import TraceCache
    from tests.faults import DECODE_FAULTS, FAULTS, detect, detect_decode

    c = TraceCache()
    for f in [f for f in FAULTS if f.name in PREFILL]:
        assert detect(f, "bfloat16", cache=c) == detect(f, "bfloat16", cache=None), f.name
    (dec,) = [f for f in DECODE_FAULTS if f.name == DECODE]
    alone = detect_decode(dec, "float32", cache=None)
    for _ in range(2):  # the second run reads the reference's decode traces and the decode noise model
        assert detect_decode(dec, "float32", cache=c) == alone
    kinds = [k[0] for k in c.keys()]
    assert c.hits >= len(PREFILL) + 2 and kinds.count("counterfactual") > 10, c


def test_the_comparison_fails_on_a_wrong_entry():
    """The check above has teeth: counterfactual captures stored under the other dtype's key (what a key missing
    the dtype would do) change the named cause's evidence."""
    from parity.capture.cache import TraceCache
    from tests.faults import FAULTS, detect

    (f,) = [f for f in FAULTS if f.name == "interleaved rope"]
    c = TraceCache()
    detect(f, "float32", cache=c)
    detect(f, "bfloat16", cache=c)
    entries = c._entries  # the stored entries themselves: this test edits them on purpose
    fp32 = [k for k in entries if k[0] == "counterfactual" and "float32" in k]
    assert len(fp32) > 10
    for k in fp32:  # each candidate's float32 capture where its bfloat16 capture was, and back
        b = tuple("bfloat16" if part == "float32" else part for part in k)
        entries[k], entries[b] = entries[b], entries[k]
    wrong = detect(f, "bfloat16", cache=c)
    right = detect(f, "bfloat16", cache=None)
    assert wrong["evidence"] != right["evidence"], (wrong, right)


def compare_whole_table() -> int:
    """Every case of both fault tables with one shared cache (in the tests' order), then each alone: the number of
    cases whose detect() results differ (0 expected). About 10 minutes; `python -m tests.test_cache`."""
    from parity.capture.cache import TraceCache
    from tests.faults import DECODE_FAULTS, detect, detect_decode
    from tests.test_faults import CASES

    cases = [(f, d, p) for f, d, p in CASES] + [(f, d, None) for f in DECODE_FAULTS for d in ("float32", "bfloat16")]
    cache = TraceCache()
    each = lambda f, d, p, c: detect(f, d, p, cache=c) if p else detect_decode(f, d, cache=c)  # noqa: E731
    shared = [each(f, d, p, cache) for f, d, p in cases]
    alone = [each(f, d, p, None) for f, d, p in cases]
    differ = [(f.name, d, p, a, b) for (f, d, p), a, b in zip(cases, shared, alone) if a != b]
    for row in differ:
        print("differs:", *row)
    print(f"{len(cases)} cases, {len(differ)} differ; {cache!r}")
    return len(differ)


if __name__ == "__main__":
    raise SystemExit(1 if compare_whole_table() else 0)
