"""Harness cost as ratios against a bare baseline measured in the same run.

    python bench/bench.py                 # tiny default: the default report vs the bare forwards
    python bench/bench.py --spec gemma-2b --repeat 1     # real shape: one process per run, both sides

Bare: one process that imports each implementation, builds it from the same
weights in each dtype (the float64 reference included) and runs a plain
forward on each prompt: no hooks, no comparison, no probes, no report.
Harness: `python -m parity.report` with the same implementations, dtypes and
prompts. Both run in fresh processes, alternately, `--repeat` times; the
table gives the medians and their ratio (wall time, peak RSS).

At real sizes (float32 weights over 1 GiB) the harness captures each
implementation and dtype in its own process, so the bare side does too (one
process per build + forward, the float64 reference streamed layer by layer as
in the harness), and the table adds each dtype's peak RSS against the size of
one implementation's weights in that dtype: the memory target is 1.2x.
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
from parity.model.prompts import default_prompts
from parity.model.presets import resolve_spec
from parity.model.weights import random_weights
a = json.loads(sys.argv[1])
spec = resolve_spec(a["spec"])
if a.get("stored"):
    from parity.model.weight_store import stored_random_weights
    w = stored_random_weights(spec, 0)
else:
    w = random_weights(spec, 0)
prompts = default_prompts(spec)
req = Request(spec=spec, impls=a["impls"], dtypes=a["dtypes"])
impls, _ = resolve_impls(req)
jobs = [(get_adapter("litgpt-style"), "float64")] + [(ad, d) for _, ad in impls for d in a["dtypes"]]
if "only" in a:
    jobs = [jobs[a["only"]]]
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
    from parity.harness import is_large
    from parity.model.presets import resolve_spec
    from parity.model.weights import param_count

    spec = resolve_spec(a.spec)
    large = is_large(spec)
    args = {"spec": a.spec, "impls": a.impls.split(","), "dtypes": a.dtypes.split(","), "stored": large}
    harness_cmd = [sys.executable, "-m", "parity.report", "--spec", a.spec, "--impls", a.impls, "--dtypes",
                   a.dtypes, "--layers", "all", "--quiet", "--out", "/tmp/parity-bench"]
    n_jobs = 1 + len(args["impls"]) * len(args["dtypes"])
    bare_cmds = [[sys.executable, "-c", BARE, json.dumps({**args, "only": i})] for i in range(n_jobs)] if large \
        else [[sys.executable, "-c", BARE, json.dumps(args)]]
    rows = {"bare": [], "harness": []}
    for _ in range(a.repeat):
        rows["harness"].append(_one(harness_cmd))
        bare = [_one(c) for c in bare_cmds]  # one after another: wall times add, peaks do not
        rows["bare"].append((sum(w for w, _ in bare), max(r for _, r in bare)))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(r for _, r in v)) for k, v in rows.items()}
    print(f"| shape | what | wall s | peak RSS MiB |\n|---|---|---|---|")
    for k in ("bare", "harness"):
        print(f"| {a.spec} | {k} | {med[k][0]:.1f} | {med[k][1]:.0f} |")
    print(f"| {a.spec} | harness / bare | {med['harness'][0] / med['bare'][0]:.2f}x | "
          f"{med['harness'][1] / med['bare'][1]:.2f}x |")
    if large:  # each run's own peak, from the report, against one implementation's weights in its dtype
        report = json.loads(open("/tmp/parity-bench/report.json").read())
        print(f"\n| shape | run | wall s | peak RSS MiB | weights MiB | peak / weights |\n|---|---|---|---|---|---|")
        for r in report["runs"]:
            wmib = param_count(spec) * {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[r["dtype"]] / 2**20
            print(f"| {a.spec} | {r['impl']}@{r['dtype']} {r['mode']} | {r.get('wall_s', 0):.0f} | "
                  f"{r.get('peak_rss_mb', 0):.0f} | {wmib:.0f} | {r.get('peak_rss_mb', 0) / wmib:.2f}x |")


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
