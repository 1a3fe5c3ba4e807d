"""Write the fault detection table (fault x dtype x weight profile: detected / located / named, and the margin).

    python bench/detection_table.py            # prints it and rewrites the section in docs/diagnosis.md

The same faults the test suite injects (tests/faults.py), through the same harness, on the
default seeded weights and on the trained-like profile. The margin is the first divergent
tap's statistic over its bound (how far beyond honest noise and the table the fault is).
"""

import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults import FAULTS, detect  # noqa: E402

START, END = "<!-- detection-table:start -->", "<!-- detection-table:end -->"
CELLS = [("float32", "default"), ("bfloat16", "default"), ("float32", "trained-like"), ("bfloat16", "trained-like")]


def mark(ok: bool) -> str:
    return "yes" if ok else "no"


def cell(f, dtype: str, profile: str) -> str:
    if dtype in f.exempt:
        return "exempt"
    r = detect(f, dtype, profile)
    det = "note" if f.note_only and not r["detected"] else mark(r["detected"])
    margin = f", {r['margin']:.2g}x" if r["margin"] is not None else " (probe)"
    return f"{det} / {mark(r['located'])} / {mark(r['named'])}{margin if r['detected'] else ''}"


def table_text(rows: list[str]) -> str:
    """The docs/diagnosis.md section: the header, one row per fault, and what the cells and exemptions mean."""
    head = " | ".join(f"{d} {p}" for d, p in CELLS)
    exempt = sorted({f"{f.name} in {d}" for f in FAULTS for d in f.exempt})
    why = sorted({why for f in FAULTS for why in f.exempt.values()})
    return "\n".join([f"| cause | fault (implementation) | {head} |", "|---|---|" + "---|" * len(CELLS), *rows]) + (
        "\n\nEach cell: detected / located / named, and the first divergent tap's statistic over its bound "
        "(\"(probe)\": within noise, named by a probe, which fails the run; \"note\": named as a note, by design "
        f"not a failure). Exempt ({'; '.join(why)}): " + "; ".join(exempt) + ".")


def main() -> None:
    rows = []
    for f in FAULTS:
        cells = [cell(f, d, p) for d, p in CELLS]
        rows.append(f"| `{f.cause}` | {f.name} ({f.spec}) | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    table = table_text(rows)
    readme = ROOT / "docs" / "diagnosis.md"
    text = readme.read_text()
    if START in text and "--print" not in sys.argv:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: f"{START}\n{table}\n{END}", text,
                      flags=re.S)
        readme.write_text(text)


if __name__ == "__main__":
    main()
