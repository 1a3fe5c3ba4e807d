import sys, time, numpy as np
from parity.presets import PRESETS
from parity.weights import random_weights
from parity.adapters.keras_hub import KerasAdapter
from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.litgpt_style import PortOptions
from parity.taps import tap_names
spec = PRESETS["tiny-gemma"]; w = random_weights(spec, 0)
tokens = [2, 17, 300, 45, 9, 511, 128, 77]
backend = sys.argv[1]
a = KerasAdapter(backend=backend); print(a.name, a.version())
refs = {}
for dt in ("float64", "bfloat16", "float16"):
    for opt in (None, PortOptions(gelu_lowp=True)):
        ref = LitgptStyleAdapter(opt); rm = ref.build(spec, w, dt); refs[(dt, opt is not None)] = ref.run(rm, tokens).taps
for dt in sys.argv[2:]:
    t=time.time(); m = a.build(spec, w, dt); r = a.run(m, tokens); print("built+ran", dt, time.time()-t, r.unavailable)
    for key in [("float64", False), (dt, False), (dt, True)]:
        if key not in refs: continue
        R = refs[key]
        for tap in ("embed", "layers.0.mlp.act", "layers.0.mlp.hidden", "layers.3.out", "logits"):
            x, y = r.taps[tap], R[tap]
            rms = np.sqrt(np.mean(y.astype(np.float64)**2)); err = np.abs(x-y).max()
            print(f"{dt} vs port {key} {tap:22s} max_abs {err:.3g} /rms {err/rms:.3g} frac_diff {np.mean(x!=y):.2f}")
    print(a.effective(m)["activation"])
    a.release(m)
