"""Hypothesis strategies for tiny Gemma specs and prompts, for your own parity tests.

    from hypothesis import given
    from parity.suite.strategies import gemma_specs, token_prompts

    @given(gemma_specs(families=(1, 2)), st.data())
    def test_my_port(spec, data):
        tokens = data.draw(token_prompts(spec))
        ...

`weight_profiles()` draws the statistics of the seeded random weights
(`parity.model.weights.PROFILES`: "default", or "trained-like" with heavy-tailed
norm weights, a massive BOS activation and an attention sink), so a property
holds on both: `random_weights(spec, seed, profile=data.draw(weight_profiles()))`.

Plural nouns with keyword-only bounds, as hypothesis's own strategies; bad
bounds raise `hypothesis.errors.InvalidArgument` naming the value.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from parity.model.spec import GemmaSpec, gemma_layer_types


def _check_range(name: str, lo: int, hi: int, floor: int) -> None:
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo < floor or hi < lo:
        raise InvalidArgument(f"{name}: need integers {floor} <= min <= max, got min={lo!r}, max={hi!r}")


@st.composite
def _specs(draw, families, min_layers, max_layers, max_hidden, max_vocab, max_window) -> GemmaSpec:
    family = draw(st.sampled_from(families))
    layers = draw(st.integers(min_layers, max_layers))
    kv = draw(st.integers(1, 2))
    heads = kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(2, 16))  # even: rotary pairs
    hidden = draw(st.integers(4, max_hidden // 4)) * 4
    kw: dict = dict(
        family=family, name=f"hypothesis-gemma{family}", num_layers=layers, num_heads=heads, num_kv_heads=kv,
        # every real Gemma's MLP is 4x to 8x wider than hidden (a 4-wide MLP makes sandwich norms
        # amplify fp16 rounding in a way no real model does)
        head_dim=head_dim, hidden_size=hidden, intermediate_size=hidden * draw(st.integers(2, 8)),
        vocab_size=draw(st.integers(8, max_vocab)), max_position=512,
        norm_eps=draw(st.sampled_from([1e-6, 1e-6, 1e-5])),
        rope_base=draw(st.sampled_from([10_000.0, 10_000.0, 1_000_000.0])),
    )
    if family >= 2:
        window = draw(st.integers(2, max_window))
        types = gemma_layer_types(family, layers)
        kw.update(
            norm_placement="sandwich", layer_types=types,
            sliding_window=window if "local" in types else None,
            query_pre_attn_scalar=float(draw(st.sampled_from([head_dim, hidden // heads or head_dim, 2 * head_dim]))),
        )
        if family == 2:
            kw.update(attn_softcap=draw(st.sampled_from([5.0, 20.0, 50.0])),
                      final_softcap=draw(st.sampled_from([3.0, 10.0, 30.0])))
        else:
            kw.update(qk_norm=True, rope_local_base=10_000.0 if "local" in types else None,
                      rope_base=1_000_000.0, rope_scaling_factor=draw(st.sampled_from([1.0, 8.0])))
    return GemmaSpec(**kw)


def gemma_specs(
    *, families: tuple[int, ...] = (1, 2, 3), min_layers: int = 1, max_layers: int = 3,
    max_hidden: int = 128, max_vocab: int = 512, max_window: int = 24,
) -> st.SearchStrategy[GemmaSpec]:
    """Valid tiny Gemma specs of the given families (every numeric relationship a real one has)."""
    if not families or any(f not in (1, 2, 3) for f in families):
        raise InvalidArgument(f"families={families!r}: give a non-empty subset of (1, 2, 3)")
    _check_range("layers", min_layers, max_layers, 1)
    _check_range("max_hidden", 16, max_hidden, 16)
    _check_range("max_vocab", 8, max_vocab, 8)
    _check_range("max_window", 2, max_window, 2)
    return _specs(tuple(families), min_layers, max_layers, max_hidden, max_vocab, max_window)


def weight_profiles() -> st.SearchStrategy[str]:
    """A weights profile of `parity.model.weights.random_weights` (every one of `parity.model.weights.PROFILES`)."""
    from parity.model.weights import PROFILES

    return st.sampled_from(PROFILES)


def token_prompts(spec: GemmaSpec, *, min_len: int = 1, max_len: int = 40) -> st.SearchStrategy[list[int]]:
    """Token id lists valid for the spec, starting with its BOS token."""
    _check_range("prompt length", min_len, max_len, 1)
    if max_len > spec.max_position:
        raise InvalidArgument(f"max_len={max_len} exceeds the spec's max_position={spec.max_position}")
    body = st.lists(st.integers(0, spec.vocab_size - 1), min_size=min_len - 1, max_size=max_len - 1)
    return body.map(lambda ids: [spec.bos_token_id] + ids)
