"""Re-measure the honest error behind parity/numerics/tolerances.py.

For correct implementations (the port and HF) against the float64 port, over
three seeds and a 64-token prompt, print per dtype and depth the atol (in RMS
units, at the table's rtol) each tap needed. Compare with the table:

    python bench/tolerance_margin.py            # tiny-gemma
    python bench/tolerance_margin.py --deep     # 12 layers, hidden 320
"""

import argparse
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from parity.adapters import get_adapter  # noqa: E402
from parity.model.presets import PRESETS  # noqa: E402
from parity.model.taps import layer_of  # noqa: E402
from parity.numerics.tolerances import TOLERANCES  # noqa: E402
from parity.model.weights import random_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deep", action="store_true")
    ap.add_argument("--impls", default="litgpt-style,hf")
    args = ap.parse_args()
    spec = PRESETS["tiny-gemma"]
    if args.deep:
        spec = spec.replace(name="deep", hidden_size=320, intermediate_size=1024, num_layers=12, num_heads=4,
                            num_kv_heads=1, head_dim=80, vocab_size=2048)
    rng = np.random.default_rng(0)
    ref = get_adapter("litgpt-style")
    worst: dict = {}
    for seed in range(3):
        w = random_weights(spec, seed)
        toks = [2] + rng.integers(3, spec.vocab_size, 63).tolist()
        r0 = ref.run(ref.build(spec, w, "float64"), toks).taps
        for impl in args.impls.split(","):
            a = get_adapter(impl)
            for dt in ("float32", "bfloat16", "float16"):
                r = a.run(a.build(spec, w, dt), toks).taps
                for k, exp in r0.items():
                    d = np.abs(r[k] - exp)
                    need = (d - TOLERANCES[dt].rtol * np.abs(exp)).max() / np.sqrt((exp**2).mean())
                    i = layer_of(k)
                    key = (dt, k if i is None else f"layer {i}")
                    worst[key] = max(worst.get(key, 0.0), float(need))
    for (dt, where), v in sorted(worst.items()):
        print(f"{dt:9s} {where:12s} needed atol {v:.3g} x RMS   (table atol {TOLERANCES[dt].atol:g} x growth)")


if __name__ == "__main__":
    main()
