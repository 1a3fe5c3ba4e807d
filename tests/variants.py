"""Deliberately wrong variants of the lit-gpt-style port, for showing that checks can fail.

Factories here are also loadable through `--impls tests.variants:<name>`.
"""

from parity.adapters.litgpt_style import LitgptStyleAdapter


def _options(**fields):
    """The port's PortOptions, imported when a variant is made (it imports torch; collecting imports no framework)."""
    from parity.adapters.port_model import PortOptions

    return PortOptions(**fields)


def exact_gelu():
    return LitgptStyleAdapter(spec_changes={"gelu_approximate": "none"}, name="exact-gelu")


def swapped_geglu():
    return LitgptStyleAdapter(_options(geglu_swapped=True), name="swapped-geglu")


def sandwich_norms():
    return LitgptStyleAdapter(_options(extra_post_norms=True), name="sandwich-norms")


def no_unit_offset():
    return LitgptStyleAdapter(spec_changes={"norm_unit_offset": False}, name="no-unit-offset")


def unscaled_embedding():
    return LitgptStyleAdapter(spec_changes={"embed_scale": False}, name="unscaled-embedding")
