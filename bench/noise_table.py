"""Measure the honest-noise model: per dtype and weight profile, the honest noise per tap family, and the
old fixed-table verdict beside the new one on correct implementations.

    python bench/noise_table.py [--spec tiny-gemma] [--impls litgpt-style,hf,keras] [--profiles default,trained-like]

Noise: the largest statistic (atol needed, in units of each row's RMS) any member of the honest ensemble needs at
a tap of that family, cumulative mode. "old": the fixed table alone, with its old rule (atol x the whole tap's
RMS x sqrt(1 + depth)); "new": the verdict the report gives (honest noise x NOISE_MARGIN, floored by the table).
"""

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = ("embed", "layers.*.attn_norm", "layers.*.attn.scores", "layers.*.attn.probs", "layers.*.attn",
            "layers.*.mlp.act", "layers.*.mlp", "layers.*.out", "logits")


def old_verdict(report, impl: str, dtype: str, mode: str) -> bool:
    """The fixed table's rule before the honest model: |a - r| <= atol x rms(tap) x growth + rtol |r|."""
    from parity.numerics.metrics import compare_arrays, rms
    from parity.numerics.tolerances import TOLERANCES, growth

    tol = TOLERANCES[dtype]
    n = report.spec.num_layers
    ok = True
    for prompt in report.prompts:
        ref, got = report.trace(*report.reference.split("@"), prompt), report.trace(impl, dtype, prompt, mode)
        for tap in got.taps:
            if tap not in ref.taps:
                continue
            b = ref.taps[tap]
            m = compare_arrays(got.taps[tap], b, dtype, tol.atol * rms(b) * growth(tap, n, mode), tol.rtol)
            ok &= m["mismatched"] == 0 and m["finite"]
    probe_fail = any(d.severity == "divergence" for d in report.diagnosis
                     if (d.impl, d.dtype) == (impl, dtype) and d.source == "probe")
    return ok and not probe_fail


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="tiny-gemma")
    ap.add_argument("--impls", default="litgpt-style,hf,keras")
    ap.add_argument("--profiles", default="default,trained-like")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    a = ap.parse_args()
    from parity.harness import Request, run
    from parity.model.presets import PRESETS
    from parity.model.taps import family_of
    from parity.gate.verdict import used

    spec = PRESETS[a.spec]
    print("| profile | dtype | " + " | ".join(f"`{f}`" for f in FAMILIES) + " |")
    print("|---|---|" + "---|" * len(FAMILIES))
    verdicts = []
    for profile in a.profiles.split(","):
        for dtype in a.dtypes.split(","):
            rep = run(Request(spec=spec, impls=a.impls.split(","), dtypes=[dtype], mode="both",
                              weights_profile=profile))
            fam = defaultdict(float)
            for (d, mode, _p, tap), (v, _who) in rep.noise.stats.items():
                if mode == "cumulative":
                    fam[family_of(tap)] = max(fam[family_of(tap)], v)
            print(f"| {profile} | {dtype} | " + " | ".join(f"{fam[f]:.2g}" for f in FAMILIES) + " |", flush=True)
            for rv in rep.verdict.runs:
                vs_noise = max((r.stat / r.noise for r in rep.run_results(rv.impl, rv.dtype, rv.mode) if r.noise),
                               default=0.0)
                verdicts.append((profile, dtype, rv.label, rv.mode,
                                 "PASS" if old_verdict(rep, rv.impl, rv.dtype, rv.mode) else "FAIL", rv.status,
                                 used(rv.worst) if rv.worst else 0.0, vs_noise, rv.honest_taps))
    print()
    print("| profile | dtype | run | mode | old table | new verdict | worst share of bound | worst stat / noise "
          "| taps beyond the table, within noise |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, d, lab, mode, old, new, worst, vs, honest in verdicts:
        print(f"| {p} | {d} | {lab} | {mode} | {old} | {new} | {worst:.2g}x | {vs:.2g} | {honest} |")


if __name__ == "__main__":
    main()
