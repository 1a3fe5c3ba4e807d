"""Harness cost as ratios against a bare baseline measured in the same run.

    python bench/bench.py                 # tiny default: the default report vs the bare forwards
    python bench/bench.py --spec gemma-2b --impls hf --dtypes bfloat16

Bare: one process that imports each implementation, builds it from the same
weights in each dtype (the float64 reference included) and runs a plain
forward on each prompt: no hooks, no comparison, no probes, no report.
Harness: `python -m parity.report` with the same implementations, dtypes and
prompts. Both run in fresh processes, alternately, `--repeat` times; the
table gives the medians and their ratio (wall time, peak RSS).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BARE = r"""
import os, sys, json
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from parity.adapters import get_adapter
from parity.harness import Request, resolve_impls
from parity.prompts import default_prompts
from parity.spec import resolve_spec
from parity.weights import random_weights
a = json.loads(sys.argv[1])
spec = resolve_spec(a["spec"])
w = random_weights(spec, 0)
prompts = default_prompts(spec)
req = Request(spec=spec, impls=a["impls"], dtypes=a["dtypes"])
impls, _ = resolve_impls(req)
jobs = [(get_adapter("litgpt-style"), "float64")] + [(ad, d) for _, ad in impls for d in a["dtypes"]]
for adapter, d in jobs:
    model = adapter.build(spec, w, d)
    for ids in prompts.values():
        if adapter.name.startswith("keras"):
            import numpy as np
            model.lm({"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)), "int32")})
        else:
            import torch
            with torch.no_grad():
                model(torch.tensor([ids]))
    adapter.release(model)
"""




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="tiny-gemma")
    ap.add_argument("--impls", default="litgpt-style,hf,keras")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    args = {"spec": a.spec, "impls": a.impls.split(","), "dtypes": a.dtypes.split(",")}
    bare_cmd = [sys.executable, "-c", BARE, json.dumps(args)]
    harness_cmd = [sys.executable, "-m", "parity.report", "--spec", a.spec, "--impls", a.impls, "--dtypes",
                   a.dtypes, "--layers", "all", "--quiet", "--out", "/tmp/parity-bench"]
    rows = {"bare": [], "harness": []}
    for _ in range(a.repeat):
        for name, cmd in (("harness", harness_cmd), ("bare", bare_cmd)):
            rows[name].append(_one(cmd))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in rows.items()}
    print(f"| shape | what | wall s | peak RSS MiB |\n|---|---|---|---|")
    for k in ("bare", "harness"):
        print(f"| {a.spec} | {k} | {med[k][0]:.1f} | {med[k][1]:.0f} |")
    print(f"| {a.spec} | harness / bare | {med['harness'][0] / med['bare'][0]:.2f}x | "
          f"{med['harness'][1] / med['bare'][1]:.2f}x |")


def _one(cmd: list[str]) -> tuple[float, float]:
    """Run in a wrapper process so each child's own peak RSS is read, not the running max."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True)\n"
               "print(json.dumps([time.perf_counter() - t, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, p.returncode]))")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall, rss, rc = json.loads(out.stdout.strip().splitlines()[-1])
    if rc not in (0, 1):
        sys.exit(f"{cmd[:4]} exited {rc}")
    return wall, rss


if __name__ == "__main__":
    main()
