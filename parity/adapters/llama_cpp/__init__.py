"""llama.cpp (through llama-cpp-python's low-level API) as a parity implementation (`--impls llama-cpp`).

gguf_file.py writes the GGUF llama.cpp loads from the canonical weights and reads it back to canonical tensors
(`held`); capture.py reads graph nodes from llama.cpp's eval callback; readback.py reads back what llama.cpp
loaded; adapter.py is the Adapter. Nothing here is imported until a `llama-cpp*` name is asked for.
"""

from parity.adapters.llama_cpp.adapter import LlamaCppAdapter

__all__ = ["LlamaCppAdapter"]
