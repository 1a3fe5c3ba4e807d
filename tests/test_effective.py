"""The effective configuration as data (parity.model.effective): every built-in implementation reports
every property as a typed value read back from its built model, compared by value with the reference's;
a broken implementation shows exactly the property it gets wrong; the terminal prints only the differing
properties unless --verbose.
"""

from __future__ import annotations

import io

import pytest

from parity.errors import BackendMissing, ParityInputError, Unsupported
from parity.model.effective import (BY_NAME, NOT_A_SETTING, NOT_REPORTED, PROPERTIES, Difference, Unread,
                                    differences, normalized, parse, report, same)
from parity.model.presets import PRESETS
from parity.model.weights import random_weights

PRESET_NAMES = ("tiny-gemma", "tiny-gemma2", "tiny-gemma3")
REF = "litgpt-style@float64"
PROMPT = {"p": [2, 17, 301, 5, 88, 260, 9, 140]}


def _adapter(name: str, spec):
    from parity.adapters.registry import get_adapter, installed

    if not installed(name):
        pytest.skip(f"{name} is not installed")
    a = get_adapter(name)
    try:
        a.check(spec, "float32")
    except (BackendMissing, Unsupported, ParityInputError) as e:  # e.g. keras imported on another backend
        pytest.skip(str(e))
    return a


def _effective(adapter, spec, dtype: str) -> dict:
    model = adapter.build(spec, random_weights(spec, 0), dtype)
    try:
        return adapter.effective(model)
    finally:
        adapter.release(model)


@pytest.fixture(scope="module")
def reference():
    """The reference port's effective dict per preset (float64, as the harness's reference)."""
    from parity.adapters.litgpt_style import LitgptStyleAdapter

    return {n: _effective(LitgptStyleAdapter(), PRESETS[n], "float64") for n in PRESET_NAMES}


# ------------------------------------------------------------ every implementation, every property
@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("impl", ["litgpt-style", "hf", "keras", "litgpt"])
def test_every_installed_implementation_reports_every_property(impl, preset, reference):
    spec = PRESETS[preset]
    e = _effective(_adapter(impl, spec), spec, "float32")
    props, library = parse(e)
    assert set(e) == set(BY_NAME) | {"library"} and isinstance(library, dict)
    for p in PROPERTIES:
        v = props[p.name]
        assert not isinstance(v, Unread), f"{impl} did not read {p.name}: {v}"  # every one is read back
        for x in (v if p.per_layer else (v,)):
            assert x is None and p.optional or type(x) is p.kind, (p.name, v)
        if p.per_layer:
            assert len(v) == spec.num_layers, p.name
    assert differences({REF: reference[preset], f"{impl}@float32": e}, REF) == []  # a correct build differs in nothing
    assert props["sliding_window"] == tuple(spec.window_for(i) for i in range(spec.num_layers))
    assert props["rope_base"] == tuple(spec.rope_base_for(i) for i in range(spec.num_layers))


# ------------------------------------------------------------ a broken implementation
@pytest.mark.parametrize("variant, prop, ref_value, value", [
    ("exact_gelu", "gelu_approximate", "tanh", "none"),
    ("swapped_geglu", "geglu", "gate", "up"),
    ("sandwich_norms", "norm_placement", "pre", "sandwich"),
    ("no_unit_offset", "norm_unit_offset", True, False),
    ("unscaled_embedding", "embed_scale", pytest.approx(96 ** 0.5), 1.0),
])
def test_a_broken_variant_shows_exactly_its_property(variant, prop, ref_value, value, reference):
    import tests.variants

    adapter = getattr(tests.variants, variant)()
    run = f"{adapter.name}@float32"
    found = differences({REF: reference["tiny-gemma"], run: _effective(adapter, PRESETS["tiny-gemma"], "float32")},
                        REF)
    assert found == [Difference(run, prop, ref_value, value)]


def test_a_wrong_rope_base_in_hf_shows_as_that_property(reference):
    """A value the library took differently (here: the config it was built with says another base) is read
    back from the built model's frequencies, not copied from the spec."""
    adapter = _adapter("hf", PRESETS["tiny-gemma"])
    spec = PRESETS["tiny-gemma"]
    model = adapter.build(spec, random_weights(spec, 0), "float32")
    model.model.rotary_emb.inv_freq.mul_(0.5)  # what a factor-2 linear scaling (or a drifted key) would compute
    found = differences({REF: reference["tiny-gemma"], "hf@float32": adapter.effective(model)}, REF)
    assert [d.property for d in found] == ["rope_scaling_factor"]
    assert found[0].value == (2.0,) * spec.num_layers


# ------------------------------------------------------------ comparing by value
def test_floats_compare_within_a_relative_tolerance():
    p = BY_NAME["norm_eps"]
    assert same(p, 1e-6, 1e-6 * (1 + 1e-7)) and not same(p, 1e-6, 1e-5)
    q = BY_NAME["embed_scale"]  # rounded to the activation dtype by design: compared within its precision
    assert same(q, 96 ** 0.5, 9.8125, "bfloat16") and not same(q, 96 ** 0.5, 9.8125, "float32")
    assert not same(q, 96 ** 0.5, 1.0, "bfloat16")
    assert not same(BY_NAME["tied_head"], True, 1)  # a bool is not a number
    w = BY_NAME["sliding_window"]
    assert same(w, (16, None), (16, None)) and not same(w, (16, None), (None, None))


def test_unread_values_are_shown_never_compared():
    ref = _props()
    other = _props(embed_scale=NOT_A_SETTING, gelu_approximate="none")
    assert differences({"r@float64": ref, "x@float32": other}, "r@float64") == [
        Difference("x@float32", "gelu_approximate", "tanh", "none")]
    assert parse(other)[0]["embed_scale"] == NOT_A_SETTING


def test_a_free_form_dict_keeps_its_facts_under_library():
    """A plug-in's (or an older trace's) own keys: every property reads "not reported", the rest is library."""
    d = normalized({"activation": "GELUTanh (tanh)", "query_scale": 0.125})
    assert d["library"] == {"activation": "GELUTanh (tanh)"}
    assert d["query_scale"] == 0.125 and d["norm_eps"] == {"unread": NOT_REPORTED.reason}
    assert differences({"r@float64": _props(), "x@float32": {"activation": "x"}}, "r@float64") == []


def test_report_refuses_a_missing_or_mistyped_property():
    values = {p.name: v for p, v in zip(PROPERTIES, parse(_props())[0].values())}
    report(values)
    with pytest.raises(ValueError, match="missing properties \\['qk_norm'\\]"):
        report({k: v for k, v in values.items() if k != "qk_norm"})
    with pytest.raises(ValueError, match="norm_eps='1e-6' is a str, not a float"):
        report({**values, "norm_eps": "1e-6"})


def _props(**changes) -> dict:
    s = PRESETS["tiny-gemma"]
    n = s.num_layers
    values = dict(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                  num_layers=n, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                  norm_unit_offset=True, norm_placement="pre", norm_eps=1e-6, final_norm=True,
                  gelu_approximate="tanh", geglu="gate", embed_scale=96 ** 0.5, embed_scale_dtype="activation",
                  tied_head=True, query_scale=[s.query_scale] * n, rope_base=[1e4] * n,
                  rope_scaling_factor=[1.0] * n, attn_softcap=[None] * n, final_softcap=None,
                  sliding_window=[None] * n, qk_norm=False)
    values.update(changes)
    return report(values, {"class": "test"})


# ------------------------------------------------------------ the views, from real runs
@pytest.fixture(scope="module")
def good():
    from parity.harness import Request, run

    return run(Request(spec=PRESETS["tiny-gemma"], impls=["litgpt-style", "hf"], dtypes=["float32"],
                       prompts=PROMPT, noise_members=0))


@pytest.fixture(scope="module")
def broken():
    from parity.harness import Request, run
    from tests.variants import unscaled_embedding

    return run(Request(spec=PRESETS["tiny-gemma"], impls=["unscaled-embedding"],
                       adapters={"unscaled-embedding": unscaled_embedding()}, dtypes=["float32"], prompts=PROMPT,
                       noise_members=0))


def _terminal(report, verbose=False) -> str:
    from rich.console import Console

    from parity.report.render import print_terminal

    buf = io.StringIO()
    print_terminal(report, Console(file=buf, width=250, color_system=None), verbose=verbose)
    return buf.getvalue()


def test_a_correct_run_shows_no_difference(good):
    from parity.report.html import to_html
    from parity.report.render import effective_table, to_json, to_markdown

    assert good.effective_differences == []
    t = effective_table(good)
    assert t.cols == [REF, "litgpt-style@float32", "hf@float32"] and t.differs == set() and t.unread == set()
    assert [k for k, _ in t.rows] == [p.name for p in PROPERTIES]
    assert 'class="diff"' not in to_html(good)
    md = to_markdown(good)
    assert "no properties differ from litgpt-style@float64" in md and "| gelu_approximate | tanh | tanh | tanh |" in md
    out = _terminal(good)
    assert "every implementation computes litgpt-style@float64's 23 properties" in out
    assert "gelu_approximate" not in out
    j = to_json(good)["effective"]
    assert set(j) == {REF, "litgpt-style@float32", "hf@float32"}
    assert j["hf@float32"]["embed_scale"] == pytest.approx(96 ** 0.5) and "kv_cache" in j["hf@float32"]["library"]


def test_a_broken_run_shows_only_its_property_unless_verbose(broken):
    from parity.report.html import to_html
    from parity.report.render import to_markdown

    assert broken.effective_differences == [Difference("unscaled-embedding@float32", "embed_scale",
                                                       pytest.approx(96 ** 0.5), 1.0)]
    out = _terminal(broken)
    table = out.split("┏")[1]  # the effective-configuration table, before the run table
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert len(rows) == 1 and rows[0].split()[1] == "embed_scale", out
    assert "1 property differs from the reference" in out
    verbose = _terminal(broken, verbose=True)
    assert all(f"│ {p.name} " in verbose.split("┏")[1] for p in PROPERTIES)
    assert "unscaled-embedding@float32: class GPT (parity's port)" in " ".join(verbose.split())  # library facts
    page = to_html(broken)
    assert page.count('class="diff"') == 1 and '<td class="diff">1</td>' in page
    assert "| embed_scale | 9.79796 | **1** |" in to_markdown(broken)
