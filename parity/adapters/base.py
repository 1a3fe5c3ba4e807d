"""The interface every implementation adapter has, and the result it returns.

An adapter builds one implementation from a spec and the canonical weights in
one dtype, runs tokens through the library's own forward pass, and records
what the library computes at each canonical tap. It imports its framework
inside its methods, so the rest of parity works without it; no adapter
imports another, and nothing outside adapters imports a framework.

Isolated mode: `run(..., feed=...)` maps a tap name to an array that replaces
the *input* of the sub-module producing that tap (the reference's input), so
the tap's error is local to that sub-module.

The contract (checked by parity.capture.runner.check_contract before anything is
compared; a breach exits 3 naming the implementation, the phase and the tap):

* `run` returns `RunResult(taps, unavailable)`. `taps` maps canonical tap
  names (parity.model.taps.tap_order) to numpy arrays (never framework tensors),
  the batch dimension dropped. Every canonical tap of the spec
  (`parity.model.taps.tap_names`) is either returned or declared in `unavailable`
  (or the class attribute `cannot`) as `tap -> reason`; declared taps show in
  every report as "not compared: reason". A name the contract does not know
  is refused, so a misspelt tap is never silently ignored.
* Shapes and sides, T tokens, H hidden, I the intermediate size, n heads:
    - `embed` [T, H]: embeddings after the sqrt(hidden) scale;
    - `layers.{i}.attn_norm`, `mlp_norm` [T, H]: the norm's output;
      `post_attn_norm`, `post_mlp_norm` (Gemma 2/3) [T, H]: the post norms' outputs;
    - `layers.{i}.attn` [T, H]: attention after the output projection;
      `attn_residual` [T, H]: the residual stream after attention (the pre-MLP norm's input);
    - `layers.{i}.mlp.gate`, `mlp.up`, `mlp.act` (gelu(gate)), `mlp.hidden` (act * up) [T, I];
      `layers.{i}.mlp` [T, H]: the down projection's output; `layers.{i}.out` [T, H]: the block's output;
    - `final_norm` [T, H]; `logits` [T, vocab], after the final softcap (Gemma 2);
    - optional internals: `rope.cos` [T, head_dim] (layer 0's cos table, in the dtype it is applied in),
      `layers.{i}.attn.scores` [n, T, T] (after the softcap and the mask: masked entries -inf),
      `layers.{i}.attn.probs` [n, T, T] (after the softmax).
* In isolated mode every fed sub-module's tensor inputs are replaced by
  `feed[tap]` (the reference's value of the tap that feeds it); an adapter
  whose isolated taps equal its cumulative ones although the fed inputs
  differ ignores `feed`, and the run is refused rather than labelled isolated.
* Decoding (optional; `decodes = True` declares it, `--decode N` uses it):
  `decode(model, prompt, continuation)` prefills `prompt` through the
  library's own incremental path (its KV cache, as its `generate()` would
  build it), then feeds `continuation` one token at a time (teacher forcing:
  every implementation decodes the same tokens) and returns
  `DecodeResult(steps)`, one `DecodeStep` per continuation token, in order.
  Step s is token `continuation[s]` at position p = len(prompt) + s.
    - `DecodeStep.taps`: the canonical taps at the new position, each [1, ...]
      (what `run` returns for T = 1); `attn.scores` / `attn.probs` [n, 1, L]
      over the L keys the step attended to, whose absolute positions are
      `key_positions[layer]` ([L] ints; default 0..p);
    - `DecodeStep.cache`: layer -> `CacheView(positions [L], k [kv, L, hd],
      v [kv, L, hd])`, what the layer's cache holds after the step (keys after
      the QK-norm and RoPE, as attention reads them), in any slot order, the
      positions as the library records them. Positions a step must see that
      the cache lacks fail; extra entries (masked) are allowed.
  Taps or caches it cannot expose while decoding go in `DecodeResult.unavailable`
  (cache taps are `layers.{i}.cache.k` / `.cache.v`).
* Optional members (`cannot`, `decodes`, `full_cache_taps`, `needs_own_process`)
  take the defaults below when a duck-typed adapter lacks them; parity reads
  them through parity.adapters.declared, never by probing.
* Any exception in the factory, `check` (other than ParityInputError, which is
  bad input: exit 2), `build`, `run`, `effective` or `release` is an
  implementation failure (exit 3), never a divergence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity.model.spec import GemmaSpec
from parity.model.weights import Weights

DTYPES = ("float64", "float32", "bfloat16", "float16")


@dataclass
class CacheView:
    positions: np.ndarray  # [L] int: the absolute position each entry holds
    k: np.ndarray  # [kv_heads, L, head_dim]: keys after QK-norm and RoPE
    v: np.ndarray  # [kv_heads, L, head_dim]


@dataclass
class DecodeStep:
    taps: dict[str, np.ndarray]  # canonical tap -> [1, ...] at the new position; attn internals [n, 1, L]
    cache: dict[int, CacheView] = field(default_factory=dict)  # layer -> its cache after the step
    key_positions: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [L] positions of attn internals


@dataclass
class DecodeResult:
    steps: list[DecodeStep]
    unavailable: dict[str, str] = field(default_factory=dict)  # tap -> why it cannot be captured while decoding


@dataclass(frozen=True)
class Held:
    """What a quantizing implementation computes with, for the honest reference of its runs.

    `weights`: the canonical tensors (canonical names, shapes and layout, float32) as the built model holds them,
    dequantized from its own file (a GGUF's q4_0 blocks, an ONNX model's MatMulNBits initializers). The float64
    port on these is what a correct kernel of this quantized model computes, so its runs are judged against that,
    at the same strictness as an unquantized run; the quantization loss against the given weights is reported
    apart (parity.compare.quant). `activations`: how its matmuls round their inputs
    (parity.numerics.act_quant.KINDS), which the honest-noise model then does too; None: they do not. An
    implementation that holds the given weights but rounds in its kernels (a float32 GGUF read through an F16
    KV cache) returns the given weights with `kv` (or `activations`) set: judged against the ordinary reference
    with members that round as it does, and no quantization loss.
    """
    weights: Weights
    weight_type: str  # e.g. "q4_0", "int4 (MatMulNBits, block 32)": shown in the report
    activations: str | None = None
    # how its KV cache rounds attention's operands (a parity.numerics.act_quant kind: "f16" for llama.cpp's
    # default F16 cache): K and V stored so, q and the probabilities converted so for the products with them;
    # the honest members do the same (PortOptions.kv_round). None: a float cache of the run's dtype.
    kv: str | None = None


@dataclass
class RunResult:
    taps: dict[str, np.ndarray]  # canonical tap -> [T, ...] array (batch dimension dropped)
    unavailable: dict[str, str] = field(default_factory=dict)  # tap -> why it cannot be captured


class Adapter:
    """Subclass this (or duck-type it) to add an implementation of your own."""

    name: str = "?"
    #: taps this implementation can never give, with the reason
    cannot: dict[str, str] = {}
    #: whether `decode` is implemented (the harness never probes for it)
    decodes: bool = False
    #: whether `run(model, tokens, cache_taps=True)` also returns `layers.{i}.cache.k` / `.cache.v` [T, kv, hd]
    #: (the keys and values each position writes): what a reference needs to check decode caches
    full_cache_taps: bool = False

    def needs_own_process(self) -> bool:
        """Whether it must be captured in a fresh Python process (keras, once another backend is imported)."""
        return False

    def version(self) -> str:
        raise NotImplementedError

    def check(self, spec: GemmaSpec, dtype: str) -> None:
        """Raise ParityInputError (BackendMissing if not installed) when it cannot run this spec/dtype."""

    def build(self, spec: GemmaSpec, weights: Weights, dtype: str) -> Any:
        raise NotImplementedError

    def run(self, model: Any, tokens: list[int], feed: dict[str, np.ndarray] | None = None) -> RunResult:
        raise NotImplementedError

    def decode(self, model: Any, prompt: list[int], continuation: list[int]) -> DecodeResult:
        """Prefill `prompt` through the library's cache, then one step per continuation token (see above)."""
        raise NotImplementedError

    def effective(self, model: Any) -> dict:
        """What the built model will actually compute, read from the model, not the config."""
        return {}

    def held(self, spec: GemmaSpec, weights: Weights, dtype: str) -> Held | None:
        """A quantizing implementation: the weights it will compute with (see `Held`), before `build` (it may
        write and cache the same file `build` then loads). None (the default): it computes with `weights`
        rounded to `dtype`, and the float64 port on `weights` is its honest reference."""
        return None

    def settings(self) -> dict[str, str]:
        """The choices beyond the dtype that change its numbers (weight type, KV-cache type, attention path),
        each set explicitly, never a library default nobody sees: shown with the run in every report."""
        return {}

    def release(self, model: Any) -> None:
        """Free the model's memory before the next implementation is built."""
