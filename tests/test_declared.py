"""An adapter's optional members are read once, with the documented defaults (parity.adapters.declared), and its
`check` is asked once per implementation and dtype, by parity.capture.implementations.check_adapter alone."""

import pytest

from parity.adapters.base import Adapter
from parity.adapters.declared import Declared, declared
from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.errors import ParityInputError
from parity.harness import Request, run


class _DuckTyped:  # what README's "Adding an implementation of your own" allows: no base class
    name = "duck"

    def version(self):
        return "0"


def test_a_duck_typed_adapter_gets_the_bases_defaults():
    base = Adapter()
    want = Declared(name="duck", cannot={}, decodes=base.decodes, full_cache_taps=base.full_cache_taps,
                    own_process=base.needs_own_process())
    assert declared(_DuckTyped()) == want
    assert declared(object()).name == "object"  # req.adapters may hold an object without a name


def test_declared_members_are_read():
    port = declared(LitgptStyleAdapter())
    assert (port.name, port.decodes, port.full_cache_taps, port.own_process) == ("litgpt-style", True, True, False)

    class Elsewhere(_DuckTyped):
        cannot = {"rope.cos": "computed inline"}

        def needs_own_process(self):
            return True

    got = declared(Elsewhere())
    assert got.own_process and dict(got.cannot) == {"rope.cos": "computed inline"}
    with pytest.raises(TypeError):
        got.cannot["embed"] = "x"  # a declaration is read, never written through


class _Counting(LitgptStyleAdapter):
    def __init__(self, calls, refuse=False):
        super().__init__(name="counting")
        self.calls, self.refuse = calls, refuse

    def check(self, spec, dtype):
        self.calls.append(dtype)
        if self.refuse:
            raise ParityInputError("counting cannot build this spec")

    def build(self, spec, weights, dtype):
        assert self.calls, "build before check"
        return super().build(spec, weights, dtype)


def test_check_is_asked_once_per_run(tiny):
    calls = []
    run(Request(spec=tiny, impls=["counting"], dtypes=["float32", "bfloat16"], prompts={"p": [2, 17, 301, 5]},
                adapters={"counting": _Counting(calls)}, noise_members=0))
    assert calls == ["float32", "bfloat16"]


def test_a_refused_check_stops_the_run_before_any_build(tiny):
    calls = []
    with pytest.raises(ParityInputError, match="counting cannot build this spec"):
        run(Request(spec=tiny, impls=["counting"], dtypes=["float32"], prompts={"p": [2, 17, 301, 5]},
                    adapters={"counting": _Counting(calls, refuse=True)}, noise_members=0))
    assert calls == ["float32"]


def test_capture_alone_still_checks(tiny, tiny_weights):
    from parity.capture.runner import capture

    calls = []
    capture(_Counting(calls), tiny, tiny_weights, "float32", {"p": [2, 17, 301, 5]})
    assert calls == ["float32"]
    with pytest.raises(ParityInputError, match="counting cannot build"):
        capture(_Counting([], refuse=True), tiny, tiny_weights, "float32", {"p": [2, 17, 301, 5]})
