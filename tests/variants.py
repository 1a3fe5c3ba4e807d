"""Deliberately wrong variants of the lit-gpt-style port, for showing that checks can fail.

Factories here are also loadable through `--impls tests.variants:<name>`.
"""

from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.adapters.port_model import PortOptions


def exact_gelu():
    return LitgptStyleAdapter(spec_changes={"gelu_approximate": "none"}, name="exact-gelu")


def swapped_geglu():
    return LitgptStyleAdapter(PortOptions(geglu_swapped=True), name="swapped-geglu")


def sandwich_norms():
    return LitgptStyleAdapter(PortOptions(extra_post_norms=True), name="sandwich-norms")


def no_unit_offset():
    return LitgptStyleAdapter(spec_changes={"norm_unit_offset": False}, name="no-unit-offset")


def unscaled_embedding():
    return LitgptStyleAdapter(spec_changes={"embed_scale": False}, name="unscaled-embedding")
