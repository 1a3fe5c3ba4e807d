import pytest

from parity.errors import ParityInputError
from parity.numerics.tolerances import TOLERANCES, growth, load_overrides


def test_every_dtype_has_a_reasoned_tolerance():
    assert set(TOLERANCES) == {"float64", "float32", "bfloat16", "float16"}
    for t in TOLERANCES.values():
        assert t.atol > 0 and t.rtol > 0 and len(t.reason) > 40
    # lower precision never gets a tighter tolerance
    order = ["float64", "float32", "float16", "bfloat16"]
    assert [TOLERANCES[d].atol for d in order] == sorted(TOLERANCES[d].atol for d in order)


def test_growth_is_one_in_isolated_mode_and_grows_with_depth():
    assert growth("layers.3.mlp", 4, "isolated") == 1.0
    assert growth("embed", 4, "cumulative") == 1.0
    assert growth("layers.0.attn", 4, "cumulative") < growth("layers.3.attn", 4, "cumulative") < growth("logits", 4, "cumulative")


def test_pyproject_override(tmp_path):
    p = tmp_path / "pyproject.toml"
    p.write_text('[tool.parity.tolerances.bfloat16]\natol = 0.3\nrtol = 0.02\nreason = "deep model"\n')
    table = load_overrides(p)
    assert table["bfloat16"].atol == 0.3 and table["bfloat16"].reason == "deep model"
    assert table["float32"] == TOLERANCES["float32"]


@pytest.mark.parametrize("body,needle", [
    ("[tool.parity.tolerances.bfloat16]\natol = 0.3\n", "together"),
    ("[tool.parity.tolerances.float8]\natol = 0.3\nrtol = 0.1\n", "not a dtype"),
    ("[tool.parity.tolerances.float32]\natol = -1\nrtol = 0.1\n", "non-negative"),
    ("[tool.parity\n", "TOML"),
])
def test_bad_override_is_refused(tmp_path, body, needle):
    p = tmp_path / "pyproject.toml"
    p.write_text(body)
    with pytest.raises(ParityInputError, match=needle):
        load_overrides(p)
