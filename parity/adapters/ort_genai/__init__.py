"""ONNX Runtime GenAI as an implementation: the model its own builder makes, run through its generator.

- build.py: the HF directory written from the spec and weights, the builder run on it (cached), the Gemma 3 shim;
- graph.py: where each canonical tap is in the builder's graph, and the copy with all of them as outputs;
- readback.py: the effective configuration read from genai_config.json and the graph;
- held.py: int8 / int4: the weights the built model holds, dequantized from its MatMulNBits initializers;
- adapter.py: `OrtGenaiAdapter` (check, build, run, decode, effective, held, settings, release).
"""

from parity.adapters.ort_genai.adapter import OrtGenaiAdapter

__all__ = ["OrtGenaiAdapter"]
