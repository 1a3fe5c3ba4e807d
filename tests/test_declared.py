"""An adapter's optional members are read once, with the documented defaults (parity.adapters.declared)."""

import pytest

from parity.adapters.base import Adapter
from parity.adapters.declared import Declared, declared
from parity.adapters.litgpt_style import LitgptStyleAdapter


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
