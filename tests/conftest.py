import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def tiny():
    from parity.model.presets import PRESETS

    return PRESETS["tiny-gemma"]


@pytest.fixture(scope="session")
def tiny_weights(tiny):
    from parity.model.weights import random_weights

    return random_weights(tiny, seed=0)


@pytest.fixture(scope="session")
def tokens():
    return [2, 17, 301, 5, 88, 260, 9, 140, 33, 7, 412, 3]
