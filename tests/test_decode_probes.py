"""The decode probes on their own, on the port's real decode traces with one cache entry edited the way a
broken cache would leave it: each names the cause from the evidence alone."""

import dataclasses

import numpy as np
import pytest

from parity.capture.decode import DECODE, FULL, continuation
from parity.capture.runner import capture
from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.diagnose.decode import probe, rotate
from parity.model.presets import PRESETS
from parity.model.weights import random_weights

SPEC = PRESETS["tiny-gemma2"]


@pytest.fixture(scope="module")
def traces():
    w = random_weights(SPEC, 0)
    prompt = list(range(3, 11))
    got = capture(LitgptStyleAdapter(), SPEC, w, "float64", {"p": prompt}, mode=[DECODE],
                  continuation=continuation(SPEC, 20))
    return {t.mode: t for t in got}


class First:  # what the probes read of the first divergence
    def __init__(self, step, layer, bound=1e-6):
        self.step, self.layer, self.bound, self.tap = step, layer, bound, f"layers.{layer}.cache.k"


def _edited(trace, tap, edit):
    taps = dict(trace.taps)
    taps[tap] = edit(np.array(taps[tap], dtype=np.float64))
    return dataclasses.replace(trace, taps=taps)


def _step_row(a, s, j, value):
    a[s, :, j] = value
    return a


def test_the_correct_decode_leaves_the_probes_silent(traces):
    assert probe(SPEC, traces[DECODE], traces[FULL], traces[FULL], First(5, 1)) is None


def test_a_slot_never_written_is_stale(traces):
    s = 5
    dec = _edited(traces[DECODE], "layers.1.cache.k", lambda a: _step_row(a, s, 3, 0.0))
    dec = _edited(dec, "layers.1.cache.v", lambda a: _step_row(a, s, 3, 0.0))
    cause, why = probe(SPEC, dec, traces[FULL], traces[FULL], First(s, 1))
    assert cause == "cache-stale" and "never written" in why


def test_a_slot_holding_another_positions_key_is_stale(traces):
    s = 5
    other = np.array(traces[FULL].taps["layers.1.cache.k"], np.float64)[s, :, 2]
    dec = _edited(traces[DECODE], "layers.1.cache.k", lambda a: _step_row(a, s, 3, other))
    cause, why = probe(SPEC, dec, traces[FULL], traces[FULL], First(s, 1))
    assert cause == "cache-stale" and "holds position 2's key" in why


def test_a_key_rotated_one_position_late_is_a_position_bug(traces):
    s = 5
    p = traces[DECODE].prefill + s
    ref = np.array(traces[FULL].taps["layers.1.cache.k"], np.float64)[s, :, p]  # global layer: entry j is position j
    dec = _edited(traces[DECODE], "layers.1.cache.k", lambda a: _step_row(a, s, p, rotate(ref, SPEC, 1, 1)))
    cause, why = probe(SPEC, dec, traces[FULL], traces[FULL], First(s, 1))
    assert cause == "cache-position" and "+1" in why


def test_a_missing_entry_at_the_window_edge_is_the_window(traces):
    s = 12  # position 20: the local layer 0 must see 5..20
    dec = _edited(traces[DECODE], "layers.0.cache.k", lambda a: _step_row(a, s, 0, np.nan))
    cause, why = probe(SPEC, dec, traces[FULL], traces[FULL], First(s, 0))
    assert cause == "cache-window" and "one key too few" in why
