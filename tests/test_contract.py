"""The adapter contract, checked before anything is compared: a breach is exit 3 naming it, never a PASS."""


import pytest

from parity.errors import ImplementationError, ParityInputError
from parity.harness import Request, run
from tests import contract_adapters as ca

TOKENS = {"p": [2, 17, 301, 5, 88, 260, 9, 140]}


def _run(tiny, adapter, mode="cumulative", dtype="bfloat16"):
    return run(Request(spec=tiny, impls=[adapter.name], dtypes=[dtype], prompts=TOKENS, mode=mode,
                       adapters={adapter.name: adapter}))


@pytest.mark.parametrize("cls,needle", [
    (ca.DropsTaps, "required tap(s) neither returned nor declared unavailable (layers.0.mlp.gate"),
    (ca.OnlyLogits, "required tap(s) neither returned nor declared unavailable (embed"),
    (ca.Misspelt, "tap name(s) the contract does not know, first 'layers.0.mlp_act'"),
    (ca.TorchTensors, "is a torch.Tensor, not a numpy array"),
])
def test_a_broken_contract_is_an_implementation_failure(tiny, cls, needle):
    with pytest.raises(ImplementationError, match="run\\(\\) \\(cumulative\\)") as e:
        _run(tiny, cls())
    assert needle in str(e.value) and e.value.exit_code == 3


def test_an_adapter_that_ignores_feed_is_not_called_isolated(tiny):
    with pytest.raises(ImplementationError, match="ignores feed") as e:
        _run(tiny, ca.IgnoresFeed(), mode="both")
    assert "run() (isolated)" in str(e.value)
    assert _run(tiny, ca.DropsTaps.__mro__[1](), mode="both").passed  # the port itself uses its feed


def test_declared_unavailable_taps_are_shown_everywhere(tiny, tmp_path):
    from parity.report.html import to_html
    from parity.report.render import to_json, to_markdown

    rep = _run(tiny, ca.Declares())
    assert rep.passed
    (rv,) = rep.verdict.runs
    assert len(rv.not_compared) == tiny.num_layers
    assert "4 tap(s) not compared: layers.*.mlp.hidden (fused into the down projection)" in rv.not_compared_text
    assert "not compared" in rep.verdict.headline
    data = to_json(rep)
    assert data["verdicts"][0]["not_compared"]["layers.0.mlp.hidden"] == "fused into the down projection"
    assert rv.not_compared_text in to_markdown(rep) and rv.not_compared_text in to_html(rep)


def test_two_implementations_of_one_name_are_refused(tiny):
    with pytest.raises(ParityInputError, match="both named 'hf'"):
        run(Request(spec=tiny, impls=["hf", "mine"], dtypes=["float32"], prompts=TOKENS,
                    adapters={"mine": ca.NamedHF()}))


def test_from_the_command_line_a_breach_is_one_line_and_exit_3(tmp_path, capsys):
    from parity.report.cli import main

    code = main(["--impls", "tests.contract_adapters:OnlyLogits", "--dtypes", "float32", "--tokens", "2,17,301",
                 "--quiet", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "only-logits@float32 failed in run() (cumulative)" in err[0]


class _Mangled(ca._Port):
    label = "mangled"
    how = ""

    def change(self, result):
        import numpy as np

        taps = dict(result.taps)
        t = taps["layers.1.mlp.act"].astype(np.float32)
        if self.how == "nan":
            t[0, 3] = np.nan
        elif self.how == "shape":
            t = t[:, :-1]
        taps["layers.1.mlp.act"] = t
        return type(result)(taps)


@pytest.mark.parametrize("how,needle", [("nan", "NaN in 1 element(s), first at (0, 3)"),
                                        ("shape", "shape (12, 255) != reference shape (12, 256)")])
def test_nan_and_shape_mismatches_are_named_as_such(tiny, how, needle):
    a = _Mangled()
    a.how = how
    rep = run(Request(spec=tiny, impls=[a.name], dtypes=["float32"], prompts={"p": [2, 17, 301, 5, 88, 260, 9, 140,
                                                                                 33, 7, 412, 3]},
                      adapters={a.name: a}))
    (rv,) = rep.verdict.runs
    assert rv.first.tap == "layers.1.mlp.act" and needle in rv.first.reason
    assert needle.split(",")[0] in rep.verdict.headline
    assert rv.explanation.cause == "unexplained" and needle in rv.explanation.evidence
    assert "rope" not in rv.explanation.evidence  # no counterfactual guessed at a broken array
