"""The lit-gpt-style port with its logits shifted by a constant per position, as TransformerLens' centred
unembedding does (logits minus their mean over the vocabulary): the same next-token distribution, so the
comparison removes the shift (unless --raw-logits) and the report must name it as the note `logit-shift`.

Loadable with `--impls tests.shifted_logits:centred` (the head probe can run) or
`tests.shifted_logits:centred_without_final_norm` (final_norm declared unavailable: the head probe cannot
run, the note must still appear).
"""

import numpy as np

from parity.adapters.base import RunResult
from parity.adapters.litgpt_style import LitgptStyleAdapter


class CentredUnembedding(LitgptStyleAdapter):
    """The real port; only its logits change: each position's mean over the vocabulary is subtracted."""

    def __init__(self, name: str = "centred", hide_final_norm: bool = False) -> None:
        super().__init__(name=name)
        self.hide_final_norm = hide_final_norm

    def run(self, model, tokens, feed=None):
        result = super().run(model, tokens, feed)
        taps = dict(result.taps)
        logits = taps["logits"]  # [T, vocab]
        taps["logits"] = (logits - logits.mean(axis=-1, keepdims=True, dtype=np.float64)).astype(logits.dtype)
        unavailable = dict(getattr(result, "unavailable", None) or {})
        if self.hide_final_norm:
            taps.pop("final_norm", None)
            unavailable["final_norm"] = "fused into the unembedding (as a test: the head probe cannot run)"
        return RunResult(taps, unavailable=unavailable)


def centred():
    return CentredUnembedding()


def centred_without_final_norm():
    return CentredUnembedding("centred-no-final-norm", hide_final_norm=True)
