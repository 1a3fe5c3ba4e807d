"""Write the fault detection table (fault x dtype: detected / located / named).

    python bench/detection_table.py            # prints it and rewrites the README section

The same faults the test suite injects (tests/faults.py), through the same harness.
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


def mark(ok: bool) -> str:
    return "yes" if ok else "no"


def main() -> None:
    rows = ["| cause | fault (implementation) | float32 | bfloat16 |", "|---|---|---|---|"]
    for f in FAULTS:
        cells = []
        for d in ("float32", "bfloat16"):
            if d in f.exempt:
                cells.append(f"exempt: {f.exempt[d]}")
                continue
            r = detect(f, d)
            det = "note" if f.note_only and not r["detected"] else mark(r["detected"])
            cells.append(f"detected {det} / located {mark(r['located'])} / named {mark(r['named'])}")
        rows.append(f"| `{f.cause}` | {f.name} ({f.spec}) | {cells[0]} | {cells[1]} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{table}\n{END}", text, flags=re.S)
        readme.write_text(text)


if __name__ == "__main__":
    main()
