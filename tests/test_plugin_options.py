"""Every `--parity-*` option (and PARITY_* variable) checked when pytest configures: a bad value is one usage
error (exit status 4, as pytest gives any bad command-line option) naming the option, the value and the fix,
before any test runs; and a hostile plug-in implementation fails its tests, never passes.

tests/test_plugin.py covers unknown dtypes, specs and implementations, a missing checkpoint and waiver files;
these are the other kinds of bad value. The inner sessions run in this process (pytester).
"""

import json
import time

import pytest

pytest_plugins = ["pytester"]

WAIVER = '[[waiver]]\nimpl = "hf"\ntap = "*"\ndtype = "float32"\ncause = "geglu-swapped"\nreason = "r"\n' \
         'expires = 2099-01-01\n'


@pytest.fixture(scope="module", autouse=True)
def warm():
    """The inner sessions drop the modules they imported when they end, and extension modules cannot load
    twice: import the port's whole path here once, first (as tests/test_plugin.py does)."""
    import ml_dtypes  # noqa: F401
    import safetensors.numpy  # noqa: F401

    from parity.harness import Request, run
    from parity.model.presets import PRESETS

    run(Request(spec=PRESETS["tiny-gemma"], impls=["litgpt-style"], dtypes=["float32"], mode="cumulative",
                prompts={"p": [2, 5, 7]}))


def _files(pytester):
    """What the bad inputs read: a malformed baseline, a baseline of another format, a directory of garbage,
    a pickled checkpoint, a config.json with a string where a number goes."""
    (pytester.path / "bad.json").write_text("{not json")
    (pytester.path / "other.json").write_text(json.dumps({"format": "something-else", "runs": {}}))
    (pytester.path / "adir").mkdir()
    (pytester.path / "garbage").mkdir()
    (pytester.path / "garbage" / "notes.txt").write_text("hello")
    (pytester.path / "pickled").mkdir()
    (pytester.path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    (pytester.path / "cfg").mkdir()
    from parity.model.presets import PRESETS
    from parity.model.spec import save_config_json

    save_config_json(PRESETS["tiny-gemma"], pytester.path / "cfg")
    cfg = json.loads((pytester.path / "cfg" / "config.json").read_text())
    cfg["hidden_size"] = "64"
    (pytester.path / "cfg" / "config.json").write_text(json.dumps(cfg))
    (pytester.path / "waivers.toml").write_text(WAIVER)


# (class of bad value, argv, env, the text the one line holds)
CASES = [
    ("decode negative", ["--parity-decode=-2"], {}, "--parity-decode '-2' is not a step count; give N >= 0"),
    ("decode not a number", ["--parity-decode", "many"], {}, "--parity-decode 'many' is not a step count"),
    ("decode a fraction", ["--parity-decode", "1.5"], {}, "--parity-decode '1.5' is not a step count"),
    ("dtypes duplicate", ["--parity-dtypes", "float32,float32"], {}, "--parity-dtypes lists 'float32' more than once"),
    ("dtypes empty", ["--parity-dtypes", ""], {}, "--parity-dtypes is empty"),
    ("dtypes empty entry", ["--parity-dtypes", "float32,,bfloat16"], {}, "has an empty entry"),
    ("impls duplicate", ["--parity-impls", "hf,litgpt-style,hf"], {}, "--parity-impls lists 'hf' more than once"),
    ("impls empty", ["--parity-impls", " , "], {}, "--parity-impls is empty"),
    ("impls malformed factory", ["--parity-impls", "my_pkg:"], {}, "'my_pkg:' is not module:factory"),
    ("impls unknown module", ["--parity-impls", "no_such_module_x:make"], {}, "cannot load 'make' from"),
    ("baseline malformed", ["--parity-baseline", "bad.json"], {}, "--parity-baseline baseline"),
    ("baseline other format", ["--parity-baseline", "other.json"], {}, "is not a parity-baseline"),
    ("baseline a directory", ["--parity-baseline", "adir"], {}, "--parity-baseline 'adir' is a directory"),
    ("baseline empty", ["--parity-baseline", ""], {}, "--parity-baseline is empty"),
    ("report dir empty", ["--parity-report-dir", ""], {}, "--parity-report-dir is empty"),
    ("report dir a file", ["--parity-report-dir", "bad.json"], {}, "bad.json' cannot be written (File exists)"),
    ("waivers empty", ["--parity-waivers", ""], {}, "--parity-waivers is empty"),
    ("waivers a directory", ["--parity-waivers", "adir"], {}, "cannot be read"),
    ("checkpoint of garbage", ["--parity-checkpoint", "garbage"], {}, "no checkpoint layout recognised"),
    ("checkpoint pickled", ["--parity-checkpoint", "pickled"], {}, "a pickled torch checkpoint, which parity never"),
    ("checkpoint empty", ["--parity-checkpoint", ""], {}, "--parity-checkpoint is empty"),
    ("spec wrong type", ["--parity-spec", "cfg/config.json"], {}, "hidden_size"),
    ("spec empty", ["--parity-spec", ""], {}, "--parity-spec is empty"),
    ("threads zero", [], {"PARITY_THREADS": "0"}, "PARITY_THREADS='0' is not a positive thread count"),
    ("threads huge", [], {"PARITY_THREADS": "100000"}, "PARITY_THREADS='100000'"),
    ("timeout negative", [], {"PARITY_TIMEOUT": "-1"}, "PARITY_TIMEOUT='-1' is not a number of seconds"),
    ("stream unknown", [], {"PARITY_STREAM": "sometimes"}, "PARITY_STREAM='sometimes'; use auto, always or never"),
]


@pytest.mark.parametrize("what,args,env,needle", CASES, ids=[c[0] for c in CASES])
def test_a_bad_option_is_one_usage_error_before_any_test(pytester, monkeypatch, what, args, env, needle):
    _files(pytester)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    pytester.makepyfile(test_x="def test_x(impl_dtype):\n    pass\n\ndef test_y(parity_report):\n    pass\n")
    start = time.perf_counter()
    r = pytester.runpytest("-p", "no:cacheprovider", *args)
    took = time.perf_counter() - start
    assert r.ret == pytest.ExitCode.USAGE_ERROR, "\n".join(r.outlines + r.errlines)
    errors = [line for line in r.errlines if line.startswith("ERROR: ")]
    assert len(errors) == 1 and errors[0].startswith("ERROR: parity: ") and needle in errors[0], r.errlines
    assert not any("Traceback" in line for line in r.outlines + r.errlines)
    assert not any(" passed" in line or " failed" in line for line in r.outlines)  # nothing ran
    assert took < 10, f"{what}: refused after {took:.1f}s"


def test_a_bad_choice_is_pytests_own_usage_error(pytester):
    r = pytester.runpytest("-p", "no:cacheprovider", "--parity-weights-profile", "heavy")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert any("--parity-weights-profile" in line and "invalid choice" in line for line in r.errlines)


def test_a_good_baseline_and_waivers_are_accepted(pytester):
    """The checks refuse what is bad, not everything: a valid baseline, waivers, decode steps and dtypes pass
    configure (no test collected, exit 5)."""
    from parity.gate.baseline import FORMAT

    _files(pytester)
    (pytester.path / "good.json").write_text(json.dumps({"format": FORMAT, "runs": {}}))
    r = pytester.runpytest("-p", "no:cacheprovider", "--parity-baseline", "good.json", "--parity-waivers",
                           "waivers.toml", "--parity-decode", "3", "--parity-dtypes", "bfloat16,float32",
                           "--parity-impls", "litgpt-style,tests.variants:exact_gelu")
    assert r.ret == pytest.ExitCode.NO_TESTS_COLLECTED, r.errlines


HOSTILE = """
import sys

from parity.adapters.base import RunResult
from parity.adapters.litgpt_style import LitgptStyleAdapter


def exits():
    sys.exit(0)


class Nothing(LitgptStyleAdapter):
    def run(self, model, tokens, feed=None):
        taps = super().run(model, tokens, feed).taps
        return RunResult({}, unavailable={t: "not today" for t in taps})


def declares_nothing():
    return Nothing(name="declares-nothing")
"""


@pytest.mark.parametrize("factory,needle", [
    ("exits", "hostile:exits failed in its factory: it called sys.exit(0)"),
    ("declares_nothing", "declares-nothing@float32 failed in compare (cumulative): no tap was compared"),
])
def test_a_hostile_plugin_fails_its_tests_with_one_line(pytester, factory, needle):
    """A factory that exits the process was an INTERNALERROR with exit status 0; an implementation that declares
    every tap unavailable was a 60-line traceback per test. Each is now its tests' error, one line each."""
    pytester.makepyfile(hostile=HOSTILE, test_suite="from parity.test_logits import test_logits_within_tolerance\n")
    pytester.syspathinsert()
    r = pytester.runpytest("-p", "no:cacheprovider", "--parity-impls", f"hostile:{factory}",
                           "--parity-dtypes", "float32")
    assert r.ret == pytest.ExitCode.TESTS_FAILED, "\n".join(r.outlines + r.errlines)
    out = r.outlines + r.errlines
    r.assert_outcomes(errors=1)
    said = [line for line in out if needle in line]
    # pytest's own short summary repeats the error after "ERROR <test id> - Failed: " (cut to the terminal's width,
    # so present or not depending on COLUMNS); every other mention is parity's one line
    ours = [line for line in said if not line.startswith("ERROR ")]
    assert ours and all(line.startswith("parity: implementation failed: ") for line in ours), out
    assert all(" - Failed: parity: implementation failed: " in line for line in said if line.startswith("ERROR ")), out
    assert not any("Traceback" in line or "INTERNALERROR" in line or "During handling" in line for line in out)
