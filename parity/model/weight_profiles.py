"""The `trained-like` weight profile: seeded random weights with the statistics of released Gemma checkpoints.

The default profile (`weights.random_tensor`) draws every matrix at
1/sqrt(fan_in) and every norm weight at |w| in [0.1, 0.6]. Released Gemma
checkpoints look different in three ways that decide how large the numbers
in a forward pass get, and so whether a low-precision verdict holds:

* Heavy-tailed RMSNorm weights. Gemma multiplies by (1 + w), w stored centred
  on 0, and trained values of (1 + w) run from about 0 (w near -1: a channel
  switched nearly off, e.g. 0.02) to about +30 on a few channels, most of them
  modest (0.3..3). Here: every norm's (1 + w) is log-normal around 1 (sigma
  0.5), plus a few channels switched off (0.015..0.15, one of them <= 0.05) and
  a few large ones (5..30, one of them >= 20). A large scale goes with
  correspondingly small weights where the network reads it (a pre-norm's
  channel: that column of the projections it feeds; a post-norm's channel: that
  row of the projection before it; q_norm against k_norm on the same rotary
  pair), because only the product is what training determines: the factor of
  30 is still multiplied and rounded in every dtype, but it does not swamp the
  attention and MLP statistics of a 96-wide model. The final norm's large
  channels are not compensated (they reach the logits, as trained ones do).
* A massive activation on BOS. Trained Gemmas carry, on the BOS token, one
  residual channel c (the same in every layer) hundreds of times the typical
  element (peaks measured from about 400x on gemma-7b to 1e5x on gemma-3).
  Here: the BOS embedding row's channel c is set so that after the
  sqrt(hidden) scale it is `BOS_PEAK` (800) times the other elements' RMS; the
  other tokens' channel c, and what the attention and MLP outputs write to it,
  are kept small (x0.1), so the channel is BOS's alone. As in trained models
  the final norm's weight of channel c is near -1 ((1 + w) in 0.01..0.03), so
  the tied head is not dominated by it (BOS's own logit at BOS is about 25 at most);
  every per-layer pre-norm keeps channel c at (1 + w) in 0.8..1.25, so the
  normalised BOS row is ~one-hot on c.
* An attention sink. Most of most queries' attention goes to BOS (key 0) and
  the other probabilities are tiny. Here it is built into the weights: every
  ordinary token's embedding shares a common component along a channel d != c
  (`EMBED_MEAN` = 4x the typical element: anisotropic embeddings), so every
  normalised non-BOS row has a component along d and every query gets
  q ~ W_q[:, d]; BOS's normalised row is ~one-hot on c, so k_BOS ~ W_k[:, c].
  In the lowest-frequency rotary pair (dims j = head_dim/2 - 1 and
  j + head_dim/2, which half-split RoPE rotates by under 0.01 rad per 48
  positions at base 1e4 and head_dim 32), for every head and kv head,
  W_q[dim, d] and W_k[dim, c] are aligned (same sign) and W_k[dim, d] opposed,
  so every query scores BOS high and the other keys a little low. The rows d
  (and c) of o_proj and down_proj are small (x0.1), so the common component
  persists through the layers as the mean direction of a trained residual
  stream does. Magnitudes are solved per layer from the expected growth of
  the residual stream (the post-norm weights of the layers before; for Gemma
  1 the GeGLU output's variance) for target scores of +5 on BOS and -2 on the
  other keys: BOS probability about 0.5-0.95 for most queries and layers.
  Gemma 2's softcapping (tanh(x / cap) * cap) limits scores to +-cap: the
  targets are taken through the tanh and lowered to +0.8 cap / -0.4 cap, so a
  small cap (5 in the tiny specs) still gives a sink, with less margin. Gemma
  3's QK-norm (RMSNorm over head_dim on q and k before RoPE) keeps the
  alignment because the aligned pair dominates q and BOS's k; the score scale
  then comes from q_norm/k_norm's weights on that pair, which are solved
  instead. W_v[:, c] (and W_k[:, c] outside the pair) is small (x0.1), so the
  sink's value does not dominate attention outputs.

Measured through the port in float64 on tiny-gemma, tiny-gemma2 and
tiny-gemma3 (tests/test_weight_profiles.py checks it): BOS's peak 270..810x
the median |x| of the other rows at every layer output, mean BOS probability
0.73..0.99 per layer over the queries that see BOS, (1 + w) from 0.016 to 30.

Everything is numpy, deterministic per (seed, tensor name), rounded to
bfloat16-representable values like `weights.random_tensor`, and finite in
float16 and bfloat16 through the whole model (the largest residual value is
BOS's channel c, 800 at unit scale). A layer's tensors depend only on that
layer and the ones before it (never on num_layers), so the first N layers of a
spec's weights are the weights of its N-layer truncation, as for the default
profile. Matrices are generated a block of rows at a time (`tensor_blocks`),
so real sizes never hold a second copy.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from parity.model.spec import GemmaSpec
from parity.model.canonical import canonical_shapes
from parity.model.tensor_file import bf16_bits, bf16_to_f32

NAME = "trained-like"
BOS_PEAK = 800.0  # BOS's channel c over the other elements' RMS, after the sqrt(hidden) scale
EMBED_MEAN = 4.0  # every ordinary token's channel d, in units of the typical element
SMALL = 0.1  # what is left of channel c elsewhere (other tokens, v, k outside the pair, o/down rows)
PAIR_REST = 0.25  # the random part of the aligned q/k rows, so the designed entries dominate them
Q_ALIGNED = 4.0  # a query's aligned-pair value, in units of a typical q element
SINK_SCORE, OTHER_SCORE = 5.0, 2.0  # target scores: BOS +5, the other keys -2 (after any softcap)
MODERATE = (0.8, 1.25)  # (1 + w) of the channels the constructions read
BULK_SIGMA = 0.5  # log-normal spread of the bulk of (1 + w): ~95% in 0.37..2.7
OFF, OFF_FIRST = (0.015, 0.15), (0.015, 0.05)  # switched-off channels' (1 + w)
LARGE, LARGE_FIRST = (5.0, 30.0), (20.0, 30.0)  # the few large channels' (1 + w)
COMPENSATE_OVER = 4.0  # a norm scale this large comes with 1/scale in the weights that read it

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight$")
_NORM_NAME = re.compile(r"norm(_\d+)?\.weight$")  # Gemma 4's MoE adds post_feedforward_layernorm_1 and _2


def trained_like(spec: GemmaSpec, seed: int) -> dict[str, np.ndarray]:
    """Every canonical tensor of `spec` in the trained-like profile (float32, bfloat16-exact)."""
    return {name: trained_like_tensor(spec, name, shape, seed) for name, shape in canonical_shapes(spec).items()}


def trained_like_tensor(spec: GemmaSpec, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One trained-like tensor, whole (float32, bfloat16-exact)."""
    blocks = list(tensor_blocks(spec, name, shape, seed, rows=shape[0]))
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def tensor_blocks(spec: GemmaSpec, name: str, shape: tuple[int, ...], seed: int, rows: int) -> Iterator[np.ndarray]:
    """float32 blocks of `rows` rows of the trained-like tensor `name`, in order (the same values for any `rows`)."""
    def rounded(a: np.ndarray) -> np.ndarray:
        return bf16_to_f32(bf16_bits(a.astype(np.float32)))

    if spec.family == 4 and (g4 := _gemma4_tensor(spec, name, shape, seed)) is not None:
        yield rounded(g4)
        return
    if _NORM_NAME.search(name):
        # Gemma 1-3 store w with (1 + w) applied; Gemma 4 (no unit offset) stores the scale itself
        yield rounded(_norm_scale(spec, seed, name) - (1.0 if spec.norm_unit_offset else 0.0))
        return
    rng = _rng(seed, name)
    edit = _editor(spec, seed, name)
    for r in range(0, shape[0], rows):
        k = min(rows, shape[0] - r)
        w = rng.standard_normal((k, shape[1])) / math.sqrt(shape[1])
        yield rounded(edit(r, w))


# ------------------------------------------------------------------ Gemma 4
LAYER_SCALAR_LOW, LAYER_SCALAR_HIGH = (0.3, 0.8), (1.25, 2.0)  # away from 1 on either side (not measured)
PLE_LAYER_SIGMA = 0.7  # log-normal spread of each layer's share of the per-layer table


def _gemma4_tensor(spec: GemmaSpec, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray | None:
    """Gemma 4's own tensors (None: the shared construction). Layer scalars away from 1 (a dropped or moved
    scalar must show); the per-layer table with a per-layer scale of its own, so layers' inputs differ in size as
    trained ones do; the PLE norms and q/k norms of other widths heavy-tailed like the rest. The router (MoE) is
    the default draw here."""
    rng = _rng(seed, name)
    if name.endswith("layer_scalar"):
        layer = int(_LAYER.match(name + ".weight").group(1))  # below 1 on even layers, above on odd ones
        return np.array([_loguniform(rng, LAYER_SCALAR_HIGH if layer % 2 else LAYER_SCALAR_LOW)])
    if ".router." in name or ".experts." in name:  # the MoE statistics (near-tie router logits) are g4moe's work:
        if len(shape) == 1:  # the router's scales around 1, as the default profile draws them
            return _loguniform(rng, (0.6, 1.6), shape[0])
        return rng.standard_normal(shape) / math.sqrt(shape[-1])
    if name.endswith("norm.weight") and (shape[0] != spec.hidden_size or "per_layer" in name) \
            and not name.endswith(("q_norm.weight", "k_norm.weight")) or \
            name.endswith(("q_norm.weight", "k_norm.weight")) and shape[0] != spec.head_dim:
        # the PLE norms (width P or D) and a global layer's q/k norm (its own head dim): heavy-tailed, stored as is
        return _heavy_tailed(rng, shape[0], np.arange(shape[0]))
    return None


# ------------------------------------------------------------------ draws
def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{NAME}/{name}".encode())])


def _loguniform(rng: np.random.Generator, lo_hi: tuple[float, float], n: int | None = None):
    lo, hi = lo_hi
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n))


def _rounded_scale(g: np.ndarray) -> np.ndarray:
    """(1 + w) as it will be stored: w rounded to bfloat16."""
    return 1.0 + bf16_to_f32(bf16_bits((g - 1.0).astype(np.float32))).astype(np.float64)


@functools.lru_cache(maxsize=8)
def channels(hidden: int, seed: int) -> tuple[int, int]:
    """(c, d): BOS's massive channel and the ordinary tokens' common channel."""
    c, d = _rng(seed, "channels").choice(hidden, size=2, replace=False)
    return int(c), int(d)


def _tail_count(n: int) -> int:
    return max(1, round(math.sqrt(n) / 5))  # 2 of 96 channels, 9 of 2048, 15 of 5376: a few


def _heavy_tailed(rng: np.random.Generator, n: int, free: np.ndarray) -> np.ndarray:
    """Log-normal (1 + w) around 1 with a few switched-off and a few large channels among `free`."""
    g = np.exp(rng.normal(0.0, BULK_SIGMA, n))
    k = min(_tail_count(n), len(free) // 2)
    pick = rng.permutation(free)
    if k:
        off, large = pick[:k], pick[k:2 * k]
        g[off] = _loguniform(rng, OFF, k)
        g[off[0]] = _loguniform(rng, OFF_FIRST)
        g[large] = _loguniform(rng, LARGE, k)
        g[large[0]] = _loguniform(rng, LARGE_FIRST)
    return g


@functools.lru_cache(maxsize=4096)
def _norm_scale(spec: GemmaSpec, seed: int, name: str) -> np.ndarray:
    """(1 + w) of norm `name` (float64, its w bfloat16-rounded)."""
    rng = _rng(seed, name)
    h = spec.hidden_size
    c, d = channels(h, seed)
    m = _LAYER.match(name)
    kind = m.group(2) if m else name
    if kind in ("self_attn.q_norm", "self_attn.k_norm"):
        return _qk_norm_scale(spec, seed, int(m.group(1)), kind == "self_attn.q_norm")
    protect = {"model.norm.weight": [c], "input_layernorm": [c, d], _pre_mlp_norm(spec): [c]}.get(kind, [])
    g = _heavy_tailed(rng, h, np.setdiff1d(np.arange(h), protect))
    for ch in protect:
        g[ch] = rng.uniform(*MODERATE)
    if name == "model.norm.weight":
        g[c] = rng.uniform(0.01, 0.03)  # near -1, as trained: the tied head is not dominated by channel c
    return _rounded_scale(g)


def _qk_norm_scale(spec: GemmaSpec, seed: int, layer: int, is_q: bool) -> np.ndarray:
    """q_norm/k_norm: the aligned pair at the solved sink scale; q large where k is off and vice versa."""
    hd = spec.head_dim
    rng = _rng(seed, f"model.layers.{layer}.self_attn.{'q' if is_q else 'k'}_norm.weight")
    g = np.exp(rng.normal(0.0, BULK_SIGMA, hd))
    pairs = _rng(seed, f"model.layers.{layer}.qk_pairs").permutation(hd // 2 - 1)  # not the aligned pair
    for i, p in enumerate(pairs[:2]):
        large = (i == 0) == is_q  # the first pair: q large, k off; the second: k large, q off
        v = _loguniform(rng, LARGE_FIRST) if large else _loguniform(rng, OFF_FIRST)
        g[[p, p + hd // 2]] = v
    g[list(_aligned_dims(hd))] = _sink(spec, seed, layer).qk_norm
    return _rounded_scale(g)


def _pre_mlp_norm(spec: GemmaSpec) -> str:
    return "pre_feedforward_layernorm" if spec.norm_placement == "sandwich" else "post_attention_layernorm"


def _aligned_dims(hd: int) -> tuple[int, int]:
    return hd // 2 - 1, hd - 1  # the lowest-frequency rotary pair of half-split RoPE


def _compensation(spec: GemmaSpec, seed: int, norm: str) -> np.ndarray:
    """1 / (1 + w) where a norm's scale is large, 1 elsewhere."""
    g = _norm_scale(spec, seed, norm)
    return np.where(g > COMPENSATE_OVER, 1.0 / g, 1.0)


def _effective_sq(spec: GemmaSpec, seed: int, norm: str) -> float:
    """Mean of the squared (1 + w) as the next matrix sees it (compensated channels count as 1)."""
    g = _norm_scale(spec, seed, norm)
    return float(np.mean(np.where(g > COMPENSATE_OVER, 1.0, g) ** 2))


def _gelu_sq(var: float) -> float:
    """E[gelu(a)^2] for a ~ N(0, var), by Gauss-Hermite quadrature."""
    x, wts = np.polynomial.hermite_e.hermegauss(40)
    a = x * math.sqrt(var)
    gelu = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    return float(np.sum(wts * gelu ** 2) / math.sqrt(2 * math.pi))


# ------------------------------------------------------------------ the sink
class _Sink(NamedTuple):
    """The solved magnitudes of one layer's sink construction."""
    q_d: float  # W_q[pair, d]
    k_c: float  # W_k[pair, c]
    k_d: float  # -W_k[pair, d]
    qk_norm: float  # (1 + w) of q_norm and k_norm on the pair (QK-norm specs)


@functools.lru_cache(maxsize=1024)
def _residual_var(spec: GemmaSpec, seed: int, layer: int) -> float:
    """Expected mean square of an ordinary token's residual stream entering `layer`."""
    h = spec.hidden_size
    if layer == 0:
        return 1.0 + EMBED_MEAN ** 2 / h
    p = f"model.layers.{layer - 1}."
    if spec.norm_placement == "sandwich":  # each sub-layer adds its post-norm's scale
        add = _effective_sq(spec, seed, p + "post_attention_layernorm.weight") \
            + _effective_sq(spec, seed, p + "post_feedforward_layernorm.weight")
    else:  # the MLP's GeGLU output, and the little the attention adds beside the sink
        s2 = _effective_sq(spec, seed, p + "post_attention_layernorm.weight")
        add = _gelu_sq(s2) * s2 + 0.15 * _effective_sq(spec, seed, p + "input_layernorm.weight")
    return _residual_var(spec, seed, layer - 1) + add


@functools.lru_cache(maxsize=1024)
def _sink(spec: GemmaSpec, seed: int, layer: int) -> _Sink:
    h, hd, qs, cap = spec.hidden_size, spec.head_dim, spec.query_scale, spec.attn_softcap
    c, d = channels(h, seed)
    g_in = _norm_scale(spec, seed, f"model.layers.{layer}.input_layernorm.weight")
    u = EMBED_MEAN * g_in[d] / math.sqrt(_residual_var(spec, seed, layer))  # an ordinary row's normalised d
    bos = math.sqrt(h) * g_in[c]  # BOS's normalised c: the whole row's norm on one channel
    s2 = _effective_sq(spec, seed, f"model.layers.{layer}.input_layernorm.weight")  # a typical q or k element
    sink, other = SINK_SCORE, OTHER_SCORE
    if cap is not None:  # aim through the tanh: the margin cannot exceed 2 * cap
        sink, other = min(sink, 0.8 * cap), min(other, 0.4 * cap)
        sink, other = cap * math.atanh(sink / cap), cap * math.atanh(other / cap)
    q_d = Q_ALIGNED / u  # every query's aligned pair ~ Q_ALIGNED
    if not spec.qk_norm:
        # score = query_scale * 2 (the pair) * q_pair * k_pair
        return _Sink(q_d, sink / (qs * 2 * Q_ALIGNED * bos), other / (qs * 2 * Q_ALIGNED * u), 1.0)
    # QK-norm: q and BOS's k are normalised over head_dim; the pair dominates both, and the
    # q_norm/k_norm weights on the pair (g each) set the scale: score = qs * 2 * q_hat * k_hat * g^2
    k_c = Q_ALIGNED / bos
    q_hat = Q_ALIGNED / math.sqrt((2 * Q_ALIGNED ** 2 + 2 * s2 * PAIR_REST ** 2 + (hd - 2) * s2) / hd)
    k_hat = math.sqrt(hd / 2) * Q_ALIGNED / math.sqrt(Q_ALIGNED ** 2 + (hd - 2) / 2 * SMALL ** 2)
    g2 = sink / (qs * 2 * q_hat * k_hat)
    r = min(other / (qs * 2 * q_hat * g2), 0.8 * math.sqrt(hd / 2))  # an ordinary key's normalised pair
    s = math.sqrt(s2 * (PAIR_REST ** 2 * 2 + hd - 2) / hd)  # its other elements' RMS
    beta = r * s * math.sqrt(hd / (hd - 2 * r * r))
    return _Sink(q_d, k_c, beta / u, math.sqrt(g2))


# ------------------------------------------------------------------ the MoE router (Gemma 4)
ROUTER_TIE_PAIRS = 0.25  # share of the experts' rows drawn as near-copies of another's: trained routers have
# experts that many tokens score almost alike, so the k-th and (k+1)-th probabilities often nearly tie
ROUTER_TIE_GAP = (4e-3, 3e-2)  # relative difference of a pair's rows, log-uniform: at least one bf16 ulp (the
# profile's weights are stored bf16-exact, and a smaller gap would round to an exact, degenerate tie)


def router_near_ties(spec: GemmaSpec, seed: int, name: str):
    """The router projection [E, D] with near-tied pairs: experts (2j, 2j+1) for j < E * ROUTER_TIE_PAIRS share one
    row, the second moved by a relative ROUTER_TIE_GAP, so every token scores them within about that share of
    their logit. Each pair's rows come from their own seeded draw: the same values in any row blocking."""
    e, d = spec.num_experts, spec.hidden_size
    pairs = max(1, int(e * ROUTER_TIE_PAIRS))

    def edit(r0, w):
        for i in range(r0, r0 + len(w)):
            j = i // 2
            if j >= pairs:
                continue
            rng = _rng(seed, f"{name}/pair{j}")
            base = rng.standard_normal(d) / math.sqrt(d)
            gap = float(_loguniform(rng, ROUTER_TIE_GAP))
            w[i - r0] = base * (1.0 + gap) if i % 2 else base
        return w
    return edit


# ------------------------------------------------------------------ matrices
def _editor(spec: GemmaSpec, seed: int, name: str):
    """A function (first row, float64 block) -> the block with the profile's structure, row by row."""
    h, hd = spec.hidden_size, spec.head_dim
    c, d = channels(h, seed)
    none = lambda r0, w: w  # noqa: E731
    if name == "model.embed_tokens_per_layer.weight":  # [rows, L * P], drawn at 1/sqrt(L * P): each layer's
        p = spec.ple_dim  # slice at 1/sqrt(P) times a scale of its own, so the layers' inputs differ in size
        scale = np.repeat(np.exp(_rng(seed, name + "/layers").normal(0.0, PLE_LAYER_SIGMA, spec.num_layers)), p)
        scale *= math.sqrt(spec.num_layers)
        return lambda r0, w: w * scale[: w.shape[1]]
    if spec.family == 4 and (m4 := _LAYER.match(name)) and not name.endswith("norm.weight"):
        hd = spec.head_dim_for(int(m4.group(1)))  # Gemma 4: the global layers' own head dim
    if name == "model.embed_tokens.weight":
        bos = spec.bos_token_id

        def embed(r0, w):
            w[:, c] *= SMALL
            w[:, d] += EMBED_MEAN / math.sqrt(h)
            if r0 <= bos < r0 + len(w):
                row = w[bos - r0]
                row[d] -= EMBED_MEAN / math.sqrt(h)
                row[c] = 0.0
                row *= math.sqrt((h - 1) / h / max(float(np.sum(row ** 2)), 1e-12))  # the rest: unit RMS
                row[c] = BOS_PEAK / math.sqrt(h)
            return w
        return embed
    m = _LAYER.match(name)
    if not m:
        return none  # lm_head: as the default
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "router.proj":
        return router_near_ties(spec, seed, name)
    p = f"model.layers.{layer}."
    sandwich = spec.norm_placement == "sandwich"
    cols = rows_scale = None
    if kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        cols = _compensation(spec, seed, p + "input_layernorm.weight")
    elif kind in ("mlp.gate_proj", "mlp.up_proj"):
        cols = _compensation(spec, seed, p + _pre_mlp_norm(spec) + ".weight")
    elif kind in ("self_attn.o_proj", "mlp.down_proj"):
        rows_scale = np.ones(h)
        if sandwich:
            post = "post_attention_layernorm" if kind == "self_attn.o_proj" else "post_feedforward_layernorm"
            rows_scale = _compensation(spec, seed, p + post + ".weight")
        rows_scale[[c, d]] *= SMALL  # the sub-layers write little to BOS's channel and the common one

    sink = _sink(spec, seed, layer) if kind in ("self_attn.q_proj", "self_attn.k_proj") else None
    kv = spec.kv_heads_for(layer) if spec.family == 4 else spec.num_kv_heads
    signs = _rng(seed, f"{p}sink_signs").choice([-1.0, 1.0], kv)
    group = spec.num_heads // kv

    def edit(r0, w):
        idx = np.arange(r0, r0 + len(w))
        if cols is not None:
            w *= cols
        if rows_scale is not None:
            w *= rows_scale[idx, None]
        if kind == "self_attn.v_proj":
            w[:, c] *= SMALL  # the sink's value stays small
        if sink is None:
            return w
        jitter = _rng(seed, f"{name}/jitter").uniform(0.8, 1.25, spec.num_heads)  # heads differ a little
        aligned = np.isin(idx % hd, _aligned_dims(hd))
        head = idx // hd
        if kind == "self_attn.k_proj":
            w[~aligned, c] *= SMALL  # BOS's key is the aligned pair
        w[aligned] *= PAIR_REST
        sel = np.flatnonzero(aligned)
        if kind == "self_attn.q_proj":
            w[sel, d] = signs[head[sel] // group] * sink.q_d * jitter[head[sel]]
        else:
            w[sel, c] = signs[head[sel]] * sink.k_c * jitter[head[sel]]
            w[sel, d] = -signs[head[sel]] * sink.k_d * jitter[head[sel]]
        return w
    return edit
