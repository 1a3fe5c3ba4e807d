"""`parity.taps` moved to `parity.model.taps` and goes in 0.3.0: each name read here warns (parity._deprecated)."""

from parity._deprecated import moved

moved(__name__)
