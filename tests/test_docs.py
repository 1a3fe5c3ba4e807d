"""The documentation stays short, linked and true to the code: the README's length, every relative link in
README.md, CONTRIBUTING.md and docs/*.md, and every `python -m parity.report`, `python -m parity.capture` and
`pytest ... --parity-*` command they show, parsed by the real argument parsers (nothing is run).

A placeholder (`FILE`, `DIR`) is fine only where argparse takes it as a value: `--out DIR` parses,
`--reduce-over N` does not (an int), so a shown command must give a real number there. A usage synopsis (a
command with `[...]`) is checked flag by flag. Each check is shown failing on a broken input below."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", root / "CONTRIBUTING.md", *sorted((root / "docs").glob("*.md"))]


# ------------------------------------------------------------------ reading markdown

FENCE = re.compile(r"^(\s*)(```|~~~)")


def split_code(text: str) -> tuple[list[str], str]:
    """(code lines, prose): the lines of fenced and indented code blocks, and the rest with those blocks blanked
    (inline code spans stay in the prose; links are read from the prose with them removed)."""
    code, prose, fenced, prev_blank = [], [], False, True
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            prose.append("")
            continue
        indented = not fenced and prev_blank and line.startswith("    ") and not line.lstrip().startswith(("-", "*", "|"))
        if fenced or indented:
            code.append(line)
            prose.append("")
            prev_blank = True if indented else prev_blank  # an indented block continues line by line
            continue
        prose.append(line)
        prev_blank = not line.strip()
    return code, "\n".join(prose)


def logical_lines(lines: list[str]) -> list[str]:
    """Code lines with backslash continuations joined, and a usage synopsis's indented `[...]` lines joined to
    the line they continue."""
    out: list[str] = []
    cur = ""
    for line in lines:
        if out and not cur and re.match(r"\s+\[", line) and "[" in out[-1]:
            out[-1] += " " + line.strip()
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


INLINE = re.compile(r"`([^`\n]+)`")


def shown_commands(text: str, prog: str) -> list[list[str]]:
    """The argument lists of every `prog` command shown in code blocks or inline code spans (a shell command
    line is cut at its first `&&`, `|`, `;` or redirection, and its comment is dropped)."""
    code, prose = split_code(text)
    candidates = logical_lines(code) + INLINE.findall(prose)
    out = []
    for line in candidates:
        start = line.find(prog)
        while start >= 0:
            rest = line[start + len(prog):]
            if rest and not rest[0].isspace():  # `python -m parity.reporting` is not this command
                start = line.find(prog, start + 1)
                continue
            try:
                tokens = shlex.split(rest, comments=True)
            except ValueError as e:
                tokens = [f"<unparsable: {e}>"]
            args = []
            synopsis = bool(tokens) and tokens[0].startswith("[")  # `[--a X | --b Y]`: `|` is not a pipe there
            for t in tokens:
                if t in ("&&", "||", ";") or (t == "|" and not synopsis) or t.startswith((">", "2>", "<")):
                    break
                args.append(t)
            out.append(args)
            start = line.find(prog, start + len(prog))
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower().replace("`", "")
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_code(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, flags=re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    out |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", prose))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of one markdown file that does not resolve to a file inside the repository (and,
    with `#anchor` into a markdown file, to one of its headings)."""
    _, prose = split_code(path.read_text())
    prose = INLINE.sub("", prose)
    bad = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        if root.resolve() not in dest.parents and dest != root.resolve():
            bad.append(f"{path.name}: {target} leaves the repository")
        elif not dest.exists():
            bad.append(f"{path.name}: {target} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{path.name}: {target}: no heading #{anchor} in {dest.name}")
    return bad


# ------------------------------------------------------------------ the real parsers

def _parse_error(parse) -> str | None:
    """None when `parse()` accepts (`--help` included), else argparse's own message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse()
    except SystemExit as e:
        if e.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


def _synopsis_flags(args: list[str]) -> list[str]:
    return [m.group(0) for a in args for m in re.finditer(r"--[a-z][a-z0-9-]*", a)]


def _unknown_flags(args: list[str], known: set[str]) -> str | None:
    unknown = sorted(set(_synopsis_flags(args)) - known)
    return f"unknown option(s) {unknown}" if unknown else None


def report_command_error(args: list[str]) -> str | None:
    """Why `python -m parity.report ARGS` would be refused by its argument parser (and --decode by its one
    parser of that value), or None."""
    from parity.report.cli import parser

    p = parser()
    if any(a.startswith("[") for a in args):  # a usage synopsis: check the flags it names
        return _unknown_flags(args, set(p._option_string_actions))
    parsed = []
    err = _parse_error(lambda: parsed.append(p.parse_args(args)))
    if err or not parsed:  # refused, or --help (which parses and exits 0)
        return err
    if parsed[0].decode is not None:
        from parity.capture.decode import parse_steps
        from parity.errors import ParityInputError

        try:
            parse_steps(parsed[0].decode)
        except ParityInputError as e:
            return str(e)
    return None


class _Parsed(BaseException):  # not an Exception: main() must not catch it
    pass


def capture_command_error(args: list[str]) -> str | None:
    """Why `python -m parity.capture ARGS` would be refused by its argument parser, or None. Its parser is
    built inside `main()` (there is no parser factory), so main() runs up to its parse_args and stops there:
    the real parser, nothing captured."""
    from parity.capture.runner import main

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        real(self, *a, **kw)
        raise _Parsed

    if any(a.startswith("[") for a in args):
        args = [a for a in args if not a.startswith("[")]  # checked as flags below
    err = io.StringIO()
    with mock.patch.dict(os.environ), mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(args)  # a refused argument: one line, exit 2 (the capture command's contract)
        except _Parsed:
            return None
        except SystemExit as e:  # --help
            code = e.code
    return (err.getvalue().strip().splitlines() or [f"exit {code}"])[-1] if code else None


def pytest_option_parser() -> argparse.ArgumentParser:
    """An argparse parser holding exactly the options parity's pytest plugin registers, added through its own
    pytest_addoption (pytest's addoption takes argparse's arguments)."""
    from parity.suite.plugin import pytest_addoption

    ap = argparse.ArgumentParser(prog="pytest", add_help=False)

    class Group:
        def getgroup(self, *a, **kw):
            return self

        def addoption(self, *names, **kw):
            ap.add_argument(*names, **kw)

        def addini(self, *a, **kw):
            pass

    pytest_addoption(Group())
    return ap


def pytest_options_error(args: list[str]) -> str | None:
    """Why the `--parity-*` options of a pytest command line would be refused by the plugin's options."""
    ap = pytest_option_parser()
    known = set(ap._option_string_actions)
    mine = []
    for i, a in enumerate(args):
        name = a.split("=", 1)[0]
        if not name.startswith("--parity-"):
            continue
        if name not in known:
            return f"unknown pytest option {name}"
        mine.append(a)
        action = ap._option_string_actions[name]
        if "=" not in a and action.nargs != 0 and i + 1 < len(args):
            mine.append(args[i + 1])
    return _parse_error(lambda: ap.parse_args(mine))


# ------------------------------------------------------------------ the checks

def readme_length_error(root: Path = ROOT) -> str | None:
    n = len((root / "README.md").read_text().splitlines())
    return None if n <= README_MAX_LINES else f"README.md has {n} lines, limit {README_MAX_LINES}: move detail into docs/"


def test_readme_is_short():
    err = readme_length_error()
    assert err is None, err


def test_every_relative_link_resolves():
    bad = [b for f in doc_files() for b in broken_links(f)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_every_report_command_shown_parses():
    shown = [(f.name, a) for f in doc_files() for a in shown_commands(f.read_text(), "python -m parity.report")]
    assert len(shown) >= 10, f"expected the docs to show report commands, found {len(shown)}"
    bad = [f"{name}: python -m parity.report {shlex.join(a)}: {err}"
           for name, a in shown if (err := report_command_error(a))]
    assert not bad, "\n".join(bad)
    first = ('python3 -m venv .venv && . .venv/bin/activate && pip install "torch==2.13.0" && '
             'pip install -e ".[test]" && python -m parity.report --layers all')
    assert first in (ROOT / "README.md").read_text(), "the README's first command changed"
    assert "python -m pytest -n 2 -q" in (ROOT / "README.md").read_text(), "the README's test command changed"


def test_every_capture_command_shown_parses():
    shown = [(f.name, a) for f in doc_files() for a in shown_commands(f.read_text(), "python -m parity.capture")]
    bad = [f"{name}: python -m parity.capture {shlex.join(a)}: {err}"
           for name, a in shown if a and (err := capture_command_error(a))]
    assert not bad, "\n".join(bad)


def test_every_pytest_option_shown_exists():
    known = set(pytest_option_parser()._option_string_actions)
    named = {m for f in doc_files() for m in re.findall(r"--parity-[a-z][a-z-]*[a-z]", f.read_text())}
    assert named, "the docs name no --parity-* option"
    assert not named - known, f"options the docs name that the plugin does not register: {sorted(named - known)}"
    bad = []
    for f in doc_files():
        for prog in ("python -m pytest", "pytest"):
            for a in shown_commands(f.read_text(), prog):
                if (err := pytest_options_error(a)):
                    bad.append(f"{f.name}: {prog} {shlex.join(a)}: {err}")
    assert not bad, "\n".join(bad)


def test_detection_table_lives_where_the_bench_writes_it():
    script = (ROOT / "bench" / "detection_table.py").read_text()
    m = re.search(r'ROOT / "docs" / "([\w.-]+\.md)"', script)
    assert m, "bench/detection_table.py no longer names the docs file it rewrites"
    assert "<!-- detection-table:start -->" in (ROOT / "docs" / m.group(1)).read_text()


# ------------------------------------------------------------------ the checks fail on broken input

def test_extractor_finds_commands_in_blocks_spans_and_continuations():
    text = """Prose with `python -m parity.report --impls keras` inline.

```sh
PARITY_STREAM=always python -m parity.report --spec gemma-7b \\
    --dtypes bfloat16   # a comment
python3 -m venv .venv && python -m parity.report --layers all && echo done
```

    python -m parity.report --out DIR > log.txt
"""
    got = shown_commands(text, "python -m parity.report")
    assert got == [["--spec", "gemma-7b", "--dtypes", "bfloat16"], ["--layers", "all"], ["--out", "DIR"],
                   ["--impls", "keras"]]


@pytest.mark.parametrize("args, ok", [
    (["--layers", "all"], True),
    (["--out", "DIR", "--trace", "FILE", "--waivers", "FILE"], True),  # strings: placeholders parse
    (["--bogus-flag"], False),
    (["--reduce-over", "N"], False),  # an int: a placeholder does not parse
    (["--seed", "abc"], False),
    (["--weights-profile", "odd"], False),
    (["--decode", "-2"], False),  # refused by the one parser of --decode's value
    (["--decode", "auto"], True),
    (["--spec", "PRESET|config.json", "[--bogus]"], False),  # a synopsis: flags checked
    (["[--spec", "PRESET]", "[--decode", "N|auto]"], True),
])
def test_report_command_check_fails_on_broken_commands(args, ok):
    assert (report_command_error(args) is None) == ok, report_command_error(args)


@pytest.mark.parametrize("args, ok", [
    (["--impl", "hf", "--dtype", "bfloat16", "--weights", "W", "--prompts", "P.json", "--out", "DIR"], True),
    (["--check"], True),
    (["--impl", "hf", "--dtype", "bfloat16", "--weights", "W", "--prompts", "P.json"], False),  # --out required
    (["--check", "--bogus"], False),
    (["--check", "--dtypes"], False),  # a flag missing its value
])
def test_capture_command_check_fails_on_broken_commands(args, ok):
    env = dict(os.environ)
    assert (capture_command_error(args) is None) == ok, capture_command_error(args)
    assert dict(os.environ) == env, "checking a capture command changed the environment"


@pytest.mark.parametrize("args, ok", [
    (["parity", "-k", "decode", "--parity-spec", "tiny-gemma2"], True),
    (["--parity-report-dir=DIR", "--parity-update-baseline"], True),
    (["parity", "--parity-bogus", "x"], False),
    (["--parity-weights-profile", "odd"], False),
])
def test_pytest_option_check_fails_on_broken_options(args, ok):
    assert (pytest_options_error(args) is None) == ok, pytest_options_error(args)


def test_link_check_fails_on_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Real heading\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md) [anchor](docs/a.md#real-heading) [web](https://example.com)\n"
                    "[gone](docs/missing.md) [out](../elsewhere/DESIGN.md) [bad anchor](docs/a.md#nope)\n"
                    "`[not a link](nowhere.md)`\n\n```\n[in code](nowhere.md)\n```\n")
    bad = broken_links(page, root=tmp_path)
    assert bad == ["README.md: docs/missing.md does not exist", "README.md: ../elsewhere/DESIGN.md leaves the repository",
                   "README.md: docs/a.md#nope: no heading #nope in a.md"], bad


def test_readme_limit_fails_on_a_long_readme(tmp_path):
    (tmp_path / "README.md").write_text("line\n" * (README_MAX_LINES + 1))
    assert readme_length_error(tmp_path) == (f"README.md has {README_MAX_LINES + 1} lines, limit {README_MAX_LINES}: "
                                             "move detail into docs/")
    (tmp_path / "README.md").write_text("line\n" * README_MAX_LINES)
    assert readme_length_error(tmp_path) is None


def test_every_option_is_documented():
    """A new option of the report command or the plugin shows in the README's tables and in docs/cli.md."""
    from parity.report.cli import parser

    readme, cli = (ROOT / "README.md").read_text(), (ROOT / "docs" / "cli.md").read_text()
    report = {o for o in parser()._option_string_actions if o.startswith("--") and o != "--help"}
    plugin = set(pytest_option_parser()._option_string_actions)
    missing = [f"{o} (README.md)" for o in sorted(report | plugin) if f"`{o}" not in readme and f"{o}`" not in readme
               and f", {o}" not in readme]
    missing += [f"{o} (docs/cli.md)" for o in sorted(report) if f"`{o}" not in cli]
    assert not missing, f"options not documented: {missing}"
