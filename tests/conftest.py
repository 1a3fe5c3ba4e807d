import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# numpy's OpenBLAS starts a thread per core for each BLAS call, np.dot in the comparison's metrics included; on
# the tiny models' short vectors those threads spin against each other and against the other xdist worker: a
# fault-table harness run took 10 s instead of 1 s on 2 cores. Read once, when numpy loads, which no test module
# has done yet when pytest loads this file (the plugin imports no numpy); inherited by the subprocesses tests start.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


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
