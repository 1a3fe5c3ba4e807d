"""Token prompts: the default short and long prompt, --tokens and --prompt.

No tokenizer ships with random weights, so the defaults are seeded token ids.
The long prompt is longer than every tiny preset's sliding window, because
short prompts hide position and window bugs.
"""

from __future__ import annotations

import numpy as np

from parity.errors import ParityInputError
from parity.model.spec import GemmaSpec

SHORT_LEN = 8
LONG_LEN = 48  # > the tiny presets' window of 16, with positions well past it
LONG_LEN_REAL = 128  # real widths: bf16 error accumulates over a realistic span of positions
REAL_WIDTH = 1024  # hidden sizes from here on are real models' (Gemma 3 1B: 1152)
FIRST_ORDINARY_ID = 3  # 0 pad, 1 eos, 2 bos in Gemma's vocabulary


def default_prompts(spec: GemmaSpec, seed: int = 1234) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    hi = spec.vocab_size
    lo = FIRST_ORDINARY_ID if hi > FIRST_ORDINARY_ID + 1 else 0
    long_len = min(LONG_LEN_REAL if spec.hidden_size >= REAL_WIDTH else LONG_LEN, spec.max_position)
    return {
        "short": [spec.bos_token_id] + rng.integers(lo, hi, SHORT_LEN - 1).tolist(),
        "long": [spec.bos_token_id] + rng.integers(lo, hi, long_len - 1).tolist(),
    }


def parse_tokens(text: str) -> list[int]:
    parts = text.replace(" ", "").split(",")
    if text.strip() and "" in parts:  # '2,,3' or '2,3,': an id left out is not silently dropped
        raise ParityInputError(f"{{option}} {text!r} has an empty entry; give ids separated by single commas, e.g. "
                               "2,651,6037", option="tokens")
    try:
        ids = [int(t) for t in parts if t != ""]
    except ValueError:
        raise ParityInputError(f"{{option}} {text!r} is not a comma-separated list of integers; e.g. 2,651,6037",
                               option="tokens") from None
    return ids


def text_to_tokens(text: str, spec: GemmaSpec, tokenize=None) -> list[int]:
    """Tokenize with the checkpoint's tokenizer when there is one, else bytes.

    `tokenize(text)` is the checkpoint's tokenizer (parity.adapters.hf.tokenize on its directory), returning
    None when there is none. The byte fallback maps each UTF-8 byte b to FIRST_ORDINARY_ID + b (mod the
    vocabulary): reproducible, offline, and enough to drive random weights.
    """
    if not text:
        raise ParityInputError("{option} '' is empty; give some text, or token ids (at least one)", option="prompt")
    if tokenize is not None:
        ids = tokenize(text)  # None: the directory has no tokenizer files
        if ids is not None:
            return ids
    span = max(spec.vocab_size - FIRST_ORDINARY_ID, 1)
    return [spec.bos_token_id] + [FIRST_ORDINARY_ID + (b % span) for b in text.encode("utf-8")]


def validate_tokens(name: str, ids: list[int], spec: GemmaSpec) -> list[int]:
    if not ids:
        raise ParityInputError(f"prompt {name!r} is empty; give at least one token (e.g. --tokens 2)")
    bad = [t for t in ids if not 0 <= t < spec.vocab_size]
    if bad:
        raise ParityInputError(
            f"prompt {name!r}: token id {bad[0]} is outside the vocabulary [0, {spec.vocab_size}); "
            "use ids below vocab_size or the matching spec"
        )
    if len(ids) > spec.max_position:
        raise ParityInputError(
            f"prompt {name!r} has {len(ids)} tokens, more than max_position={spec.max_position}; shorten it"
        )
    return [int(t) for t in ids]
