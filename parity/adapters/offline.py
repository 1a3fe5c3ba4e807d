"""The offline switch, set only around parity's own library calls and put back after.

parity never needs the network: checkpoints and tokenizers are local
directories and models are built from configs. Setting HF_HUB_OFFLINE at
import time (as parity once did) changed every pytest session of every project
with parity installed; `offline()` sets it for the duration of a call instead.

huggingface_hub reads HF_HUB_OFFLINE once, into `huggingface_hub.constants.
HF_HUB_OFFLINE`, when it is first imported, and every request checks that
constant (transformers asks `huggingface_hub.is_offline_mode()`, which returns
it). So the environment alone is not enough: the constant is set too while
inside, and on the way out it gets back its old value, or, when the library was
first imported inside, the value the restored environment gives.

Usable as `with offline():` or `@offline()`; nested uses restore in order.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

# forced: a user's HF_HUB_OFFLINE=0 must not let parity's calls reach the network
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# defaults: TensorFlow's C++ start-up lines silenced unless the user asked for them
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3"}
_HUB = "huggingface_hub.constants"
_UNSET = object()


def _hub_offline_from_env() -> bool:
    """What huggingface_hub computes from the environment at its import (constants.py, huggingface_hub 0.2x-2.x)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


@contextmanager
def offline(**defaults: str):
    """HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE and HF_DATASETS_OFFLINE set to 1 (and TF_CPP_MIN_LOG_LEVEL=3 and
    `defaults` where unset) inside; every variable, and huggingface_hub's offline constant, as before outside,
    an absent variable absent again, on an exception too."""
    wanted = dict(OFFLINE)
    wanted.update({k: v for k, v in {**QUIET, **defaults}.items() if k not in os.environ})
    saved = {k: os.environ.get(k) for k in wanted}
    hub = sys.modules.get(_HUB)
    hub_saved = getattr(hub, "HF_HUB_OFFLINE", _UNSET)
    os.environ.update(wanted)
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hub = sys.modules.get(_HUB)
        if hub is not None:
            # imported before: its own value back; imported inside: what it would have read from this environment
            hub.HF_HUB_OFFLINE = _hub_offline_from_env() if hub_saved is _UNSET else hub_saved
