import sys, time, numpy as np
from parity.presets import PRESETS
from parity.weights import random_weights
from parity.adapters.keras_hub import KerasAdapter
from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.litgpt_style import PortOptions
from parity.capture import isolated_feed
from parity.trace import Trace
from parity.taps import tap_names
spec = PRESETS["tiny-gemma"]; w = random_weights(spec, 0)
tokens = [2, 17, 300, 45, 9, 511, 128, 77]
backend = sys.argv[1]
a = KerasAdapter(backend=backend); print(a.name, a.version())
def port(dt, opt=None):
    ref = LitgptStyleAdapter(opt); rm = ref.build(spec, w, dt); return ref.run(rm, tokens).taps
for dt in sys.argv[2:]:
    m = a.build(spec, w, dt)
    for lab, R in ((dt+"+rope_lowp", port(dt, PortOptions(gelu_lowp=True, rope_lowp=True))), (dt+"+softmax_lowp", port(dt, PortOptions(gelu_lowp=True, softmax_lowp=True)))):
        tr = Trace(impl="p", version="", dtype=dt, spec=spec.to_dict(), weights_hash="", tokens=tokens, taps=R)
        feed = isolated_feed(spec, tr)
        # also feed the act input with the port's gate
        for i in range(spec.num_layers): feed[f"layers.{i}.mlp.act"] = R[f"layers.{i}.mlp.gate"]
        r = a.run(m, tokens, feed=feed)
        worst = {}
        for tap in tap_names(spec):
            x, y = r.taps[tap], R[tap]
            rms = np.sqrt(np.mean(y.astype(np.float64)**2)); err = np.abs(x-y).max()
            worst[tap] = (err/rms, np.mean(x != y))
        for tap in ("layers.0.attn", "layers.0.mlp.act", "layers.2.mlp.act", "layers.0.mlp", "layers.3.out", "final_norm", "logits"):
            print(f"{backend} {dt} isolated vs {lab:20s} {tap:18s} err/rms {worst[tap][0]:.3g} frac_diff {worst[tap][1]:.2f}")
    a.release(m)
