"""Nothing is removed or skipped silently (issue 18 item 8): an adapter that ignores the isolated feed is caught in
`--mode isolated` alone, and a per-position logit shift the comparison removes is always named `logit-shift`, also
when the lm-head probe cannot run."""

import json

import pytest

from parity.errors import ImplementationError
from parity.harness import Request, run
from parity.report.cli import main
from tests import contract_adapters as ca

TOKENS = {"p": [2, 17, 301, 5, 88, 260, 9, 140]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_isolated_mode_alone_catches_an_adapter_that_ignores_its_feed(tiny, dtype):
    bad = ca.IgnoresFeed()
    with pytest.raises(ImplementationError, match="ignores feed") as e:
        run(Request(spec=tiny, impls=[bad.name], dtypes=[dtype], prompts=TOKENS, mode="isolated",
                    adapters={bad.name: bad}))
    assert f"ignores-feed@{dtype} failed in run() (isolated)" in str(e.value)
    good = ca.DropsTaps.__mro__[1]()  # the same port, using its feed: the check does not fire on it
    assert run(Request(spec=tiny, impls=[good.name], dtypes=[dtype], prompts=TOKENS, mode="isolated",
                       adapters={good.name: good})).passed


def test_isolated_mode_alone_from_the_command_line_is_exit_3_naming_it(tmp_path, capsys):
    code = main(["--impls", "tests.contract_adapters:IgnoresFeed", "--dtypes", "bfloat16", "--mode", "isolated",
                 "--tokens", "2,17,301,5", "--quiet", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert "ignores-feed@bfloat16 failed in run() (isolated): ignores feed" in err[0]


SHIFTED = ["tests.shifted_logits:centred", "tests.shifted_logits:centred_without_final_norm"]


def test_a_removed_logit_shift_is_always_named(tmp_path, capsys):
    """A centred unembedding (TransformerLens' shift, 0.09-0.11 x row RMS here) passes the comparison, which
    removes the shift; report.json and the terminal name it, with the lm-head probe (`centred`) and without it
    (`centred-no-final-norm` declares final_norm unavailable, so the probe cannot tell)."""
    out = tmp_path / "o"
    code = main(["--impls", ",".join(["litgpt-style"] + SHIFTED), "--dtypes", "float32,bfloat16", "--quiet",
                 "--out", str(out)])
    terminal = capsys.readouterr().out
    assert code == 0, terminal
    report = json.loads((out / "report.json").read_text())
    notes = {(d["impl"], d["dtype"]): d for d in report["diagnosis"] if d["cause"] == "logit-shift"}
    assert set(notes) == {(i, d) for i in ("centred", "centred-no-final-norm") for d in ("float32", "bfloat16")}
    assert all(d["severity"] == "note" for d in notes.values())
    assert notes[("centred", "float32")]["source"] == "probe"  # the probe ran: its entry, not a second one
    without = notes[("centred-no-final-norm", "bfloat16")]
    assert without["source"] == "comparison" and "removed a constant per position" in without["evidence"]
    probe = [p for p in report["probes"] if p["impl"] == "centred-no-final-norm" and p.get("name") == "lm-head"]
    assert len(probe) == 2 and all(not p["cause"] for p in probe)  # could not tell: the note is the comparison's
    assert "logit-shift" in terminal
    assert not [d for d in report["diagnosis"] if d["impl"] == "litgpt-style"]  # correct: nothing to name


def test_the_note_is_not_given_to_rounding(tiny):
    """A correct port's logits differ from the reference by rounding only: the shift removed from them is smaller
    than the error left, so no note (the criterion fails for the shifted port, passes here)."""
    report = run(Request(spec=tiny, impls=["litgpt-style", "hf", SHIFTED[1]], dtypes=["float32", "bfloat16"],
                         prompts=TOKENS, mode="cumulative"))
    named = {(d.impl, d.dtype) for d in report.diagnosis if d.cause == "logit-shift"}
    assert named == {("centred-no-final-norm", "float32"), ("centred-no-final-norm", "bfloat16")}
