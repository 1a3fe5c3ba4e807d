"""Isolated feeding replaces every occurrence of a module's hidden-state input, positional or keyword."""

import numpy as np
import pytest

from parity.adapters.torch_hooks import recording


def _models():
    """The modules, defined when a test needs them: collecting the suite imports no framework."""
    import torch.nn as nn

    class Mix(nn.Module):
        """out = q + 2 k: a module given its query and key/value input separately, as cross-attention code is."""

        def forward(self, q=None, kv=None, *, query_input=None, key_input=None):
            q = q if q is not None else query_input
            kv = kv if kv is not None else key_input
            return q + 2 * kv

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Mix()

        def forward(self, h):
            return self.attn(h, h)  # the same tensor twice

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Mix()

        def forward(self, h):
            return self.attn(query_input=h, key_input=h)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Mix()

        def forward(self, h):
            return self.attn(query_input=h, key_input=h + 1)  # two different tensors of one shape

    return {"Positional": Positional, "Keywords": Keywords, "TwoInputs": TwoInputs}


@pytest.mark.parametrize("model", ["Positional", "Keywords"], ids=["attn(h, h)", "attn(query_input=h, key_input=h)"])
def test_every_occurrence_of_the_input_is_fed(model):
    import torch

    model = _models()[model]()
    h = torch.ones(1, 3, 4)
    fed = np.full((3, 4), 5.0, np.float32)
    with recording(model, {"t": ("attn", "out")}, {"attn": fed}) as taps:
        model(h)
    np.testing.assert_array_equal(taps["t"], 3 * fed)  # both q and kv came from the feed, not from h


def test_a_module_whose_input_cannot_be_told_is_an_error():
    import torch

    model = _models()["TwoInputs"]()
    with pytest.raises(RuntimeError, match="cannot feed module 'attn': 2 tensor inputs of shape"):
        with recording(model, {"t": ("attn", "out")}, {"attn": np.zeros((3, 4), np.float32)}):
            model(torch.ones(1, 3, 4))
