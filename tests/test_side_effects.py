"""No side effects at import: parity's modules, and its pytest plugin in a user's own pytest session, leave the
environment as they found it; the offline switch is set only inside `parity.adapters.offline.offline()`, around
parity's own library calls, and put back after. Each check is shown failing on a module that writes at import."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parity.adapters.offline import offline

ROOT = Path(__file__).resolve().parents[1]
# what parity set at import before, and what it sets around library calls now: absent in the clean environment
WATCHED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TF_CPP_MIN_LOG_LEVEL",
           "TRANSFORMERS_VERBOSITY", "KERAS_BACKEND")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WATCHED and not k.startswith("PYTEST_")}
    return {**env, **extra}


# imports each module named on the command line in turn; prints module -> {variable: [before, after]}
IMPORT_EACH = """
import importlib, json, os, sys
changed = {}
for name in sys.argv[1:]:
    before = dict(os.environ)
    importlib.import_module(name)
    diff = {k: [before.get(k), os.environ.get(k)] for k in set(before) | set(os.environ)
            if before.get(k) != os.environ.get(k)}
    if diff:
        changed[name] = diff
print(json.dumps(changed))
"""


def modules(root: Path, package: str) -> list[str]:
    """Every module of `package`, but the shipped tests (test_*) and __main__ (importing it runs the command)."""
    out = []
    for f in sorted((root / package).rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        if parts[-1].startswith("test_") or parts[-1] == "__main__":
            continue
        out.append(".".join(parts).removesuffix(".__init__"))
    return out


def env_writes(root: Path, package: str) -> dict:
    """module -> the environment variables importing it changed, in a fresh process with a clean environment."""
    names = modules(root, package)
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], cwd=root, env=clean_env(PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_every_parity_module_leaves_the_environment_alone():
    assert len(modules(ROOT, "parity")) > 40  # the walk finds the package
    assert env_writes(ROOT, "parity") == {}


def test_the_import_check_finds_a_module_that_writes_the_environment(tmp_path):
    pkg = tmp_path / "leaky"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "quiet.py").write_text("import os\nHOME = os.environ.get('HOME')\n")
    (pkg / "plugin.py").write_text("import os\nos.environ.setdefault('HF_HUB_OFFLINE', '1')\n")  # parity's old line
    assert env_writes(tmp_path, "leaky") == {"leaky.plugin": {"HF_HUB_OFFLINE": [None, "1"]}}


# a user's own test in another project: the environment it was started with, untouched by installed plugins
USER_TEST = """
import json, os

def test_my_environment_is_mine():
    expected = json.loads(open(os.environ["EXPECTED_ENV"]).read())
    now = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    assert 'HF_HUB_OFFLINE' not in os.environ
    assert now == expected
"""


def user_session(tmp_path: Path, *args: str, pythonpath: str = str(ROOT)) -> subprocess.CompletedProcess:
    project = tmp_path / "their_project"
    project.mkdir(exist_ok=True)
    (project / "test_theirs.py").write_text(textwrap.dedent(USER_TEST))
    env = clean_env(PYTHONPATH=pythonpath)
    env["EXPECTED_ENV"] = str(tmp_path / "env.json")
    (tmp_path / "env.json").write_text(json.dumps(env))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--trace-config", *args, "test_theirs.py"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def test_a_users_pytest_session_keeps_its_environment_with_parity_installed(tmp_path):
    proc = user_session(tmp_path)
    out = proc.stdout + proc.stderr
    # loaded through its pytest11 entry point, from this checkout
    assert f"<module 'parity.suite.plugin' from '{ROOT / 'parity' / 'suite' / 'plugin.py'}'>" in out, out[-3000:]
    assert proc.returncode == 0, out[-3000:]


def test_the_user_session_check_fails_under_a_plugin_that_writes_at_import(tmp_path):
    (tmp_path / "leaky_plugin.py").write_text("import os\nos.environ.setdefault('HF_HUB_OFFLINE', '1')\n")
    proc = user_session(tmp_path, "-p", "leaky_plugin", pythonpath=f"{tmp_path}{os.pathsep}{ROOT}")
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "assert 'HF_HUB_OFFLINE' not in" in proc.stdout


@pytest.fixture
def clean(monkeypatch):
    for k in WATCHED:
        monkeypatch.delenv(k, raising=False)


def test_offline_sets_the_switches_and_restores_absence_and_values(clean, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user's value: forced to 1 inside, put back after
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # a user's choice of TensorFlow noise: kept inside too
    before = dict(os.environ)
    with offline(TRANSFORMERS_VERBOSITY="error"):
        assert [os.environ.get(k) for k in WATCHED] == ["1", "1", "1", "1", "error", None]
    assert dict(os.environ) == before


def test_offline_restores_on_an_exception_and_when_nested(clean):
    before = dict(os.environ)
    with pytest.raises(ZeroDivisionError):
        with offline():
            with offline():
                assert os.environ["HF_HUB_OFFLINE"] == "1"
            assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"  # still inside
            1 / 0
    assert dict(os.environ) == before

    @offline()
    def library_call():
        return os.environ.get("HF_HUB_OFFLINE")

    assert library_call() == "1" and "HF_HUB_OFFLINE" not in os.environ


def test_offline_sets_and_restores_huggingface_hubs_constant(clean, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as read at its import from a clean environment
    with offline():
        assert constants.is_offline_mode()
    assert constants.HF_HUB_OFFLINE is False


# the constant read when huggingface_hub is first imported inside, then a real library call inside and after
REAL_CALL = """
import json, sys, time
from parity.adapters.offline import offline
assert "huggingface_hub" not in sys.modules
with offline():
    import huggingface_hub.constants as constants  # first imported here: it reads HF_HUB_OFFLINE=1
    first_inside = constants.is_offline_mode()
first_after = constants.is_offline_mode()
import transformers  # outside: its look-ups go online unless offline() switches the constant
with offline():
    start = time.perf_counter()
    try:
        transformers.AutoConfig.from_pretrained("google/gemma-2b")
        chain = ["loaded"]
    except OSError as e:
        chain, c = [], e
        while c is not None:
            chain.append(type(c).__name__ + ": " + str(c).splitlines()[0])
            c = c.__cause__ or c.__context__
    took = time.perf_counter() - start
print(json.dumps(dict(first_inside=first_inside, first_after=first_after, chain=chain, took=took,
                      after=constants.is_offline_mode())))
"""


def test_a_library_call_inside_offline_never_reaches_for_the_network(tmp_path):
    """Without the switch the same call retries the Hub for about 30 s and fails on a ConnectError."""
    pytest.importorskip("transformers")
    env = clean_env(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"))  # an empty cache: nothing to find locally
    proc = subprocess.run([sys.executable, "-c", REAL_CALL], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["first_inside"] is True and got["first_after"] is False and got["after"] is False
    assert any("LocalEntryNotFoundError: Cannot find the requested files in the disk cache and outgoing traffic "
               "has been disabled" in c for c in got["chain"]), got["chain"]
    assert not any("ConnectError" in c for c in got["chain"]) and got["took"] < 20, got
