"""`parity.weights` moved to `parity.model.weights` and goes in 0.3.0: each name read here warns (parity._deprecated)."""

from parity._deprecated import moved

moved(__name__)
