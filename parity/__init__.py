"""parity: layer-by-layer numerical parity checks across Gemma implementations."""

__version__ = "0.1.0"
