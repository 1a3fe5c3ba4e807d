"""The project's own lit-gpt-style PyTorch port of Gemma 1/2/3/4 (text).

One readable model file driven by a flat config (`GemmaSpec`), as litgpt
does: a disabled feature is an `nn.Identity()` so `forward` reads straight
through. Every op runs in the dtype it is given; low precision follows the
Gemma conventions (norms, softmax and rotary angles in fp32, rounded once),
and float64 stays float64 everywhere, so this port is the reference.

`PortOptions` holds the implementation choices that are not part of the
architecture (where casts happen, which projection is gated, ...). The
defaults are the correct ones; each other value reproduces one known
divergence, so the diagnosis can re-run the port with one choice changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from parity.model.spec import GemmaSpec


@dataclass(frozen=True)
class PortOptions:
    gelu_lowp: bool = False  # act-lowp: tanh-GELU op by op in the activation dtype
    geglu_swapped: bool = False  # geglu-swapped: gelu(up) * gate
    norm_cast: str = "after"  # norm-cast-order: "after" (Gemma) or "before" (Llama)
    offset_lowp: bool = False  # norm-unit-offset-lowp: (1 + w) in the parameter dtype
    rope_layout: str = "half"  # rope-layout: "half" (split halves) or "interleaved" pairs
    rope_lowp: bool = False  # rope-precision: angles, cos and sin in the activation dtype
    softmax_lowp: bool = False  # softmax-precision: softmax in the activation dtype
    final_norm: bool = True  # final-norm-missing when False
    qk_norm_after_rope: bool = False  # qk-norm-missing (misplaced variant)
    skip_qk_norm: bool = False  # qk-norm-missing: the q/k norms hold weights but do nothing
    extra_post_norms: bool = False  # norm-placement: pre-norm spec run with norms after each sub-layer too
    softcap_on_norm: bool = False  # softcap-misplaced: the final softcap applied to the final norm's output
    # --- equally correct rounding orders (parity.compare.noise's honest ensemble), not faults
    scale_q_first: bool = False  # q * scale rounded before q.k (reference JAX and keras-hub), not after
    accum_split: bool = False  # every projection summed as two half-K products rounded to the dtype
    perturb_seed: int | None = None  # the scaled embedding moved by +-1 ulp at random (a rounding-level input change)
    act_quant: str | None = None  # every projection's input rounded as a quantized runtime's matmul rounds it
    # (parity.numerics.act_quant), and with kv_round the attention's operands as a runtime's KV cache holds them:
    # K and V rounded to the cache's type, q and the probabilities to what its matmul converts them to
    kv_round: str | None = None
    # (parity.numerics.act_quant: "q8_0", "f16", ...): the honest members of a quantized run do it, as its kernels do
    # --- decode-path faults (the KV cache), each one cause of the catalogue; they act only on decode steps
    decode_window: int = 0  # cache-window: local layers see window + this many keys while decoding
    decode_pos_offset: int = 0  # cache-position: the new token rotated at position p + this (kept at p)
    decode_stale: bool = False  # cache-stale: a local ring writes the new key one slot late (a live slot overwritten)
    decode_mask_global_window: bool = False  # decode-mask: the decode step's mask applies the window on global layers
    decode_kv_quant: str | None = None  # kv-cache-precision: K and V rounded as they enter the cache (prefill
    # through the cache and decode steps alike), by a parity.numerics.act_quant kind along head_dim ("f16", "q8_0")
    prefill_mask_added_as_bool: bool = False  # decode-mask: a prefill through the cache adds its mask as 0/1, not
    # 0/-inf (litgpt #1672, Gemma 2's softcap path), so the cached prompt keys and values are not causal
    # --- Gemma 4 choices (docs/gemma4.md)
    rope_scaling_local: bool = False  # rope-wrong-layer-type: the global layers' linear scaling on local layers too
    rope_ordinary_partial: bool = False  # proportional RoPE built as ordinary partial RoPE: only the first
    # rope_proportion * head_dim dims turn, pairs (i, i + r/2), frequencies over r (Megatron-Bridge PR #4196)
    float32_islands: bool = False  # round where HF's Gemma 4 rounds to float32 whatever the dtype, float64
    # included: every RMSNorm (`x.float()`, `pow(ms, -0.5)`), RoPE angles, attention and router softmax, and the
    # embedding scales (float32 buffers). Equally correct; with it the float64 port matches HF's float64 run
    # --- Gemma 4 MoE (parity.compare.routing and the MoE causes)
    route_override: tuple = ()  # ((layer, token), expert ids) pairs: those tokens take those experts (the
    # reference replaying an implementation's honest near-tie choice), weighted by their own probabilities
    router_lowp: str = ""  # router-precision: the router probabilities rounded to this dtype before the top k
    router_no_renorm: bool = False  # topk-not-renormalised: the chosen probabilities used as they are
    expert_scale: str = "weights"  # per-expert-scale-misplaced: "weights" (Gemma), "input" (the expert's input
    # scaled instead of its output) or "none"
    expert_gate_up: str = "gate-up"  # expert-gate-up-swapped: "gate-up" (HF's rows [:I] gate, [I:] up),
    # "up-gate" (the halves swapped)
    # --- Gemma 4 faults (parity/diagnose/causes.py), each one cause of the catalogue
    attn_scale_head_dim: bool = False  # attn-scale-not-one: scores times 1/sqrt(this layer's head dim), not 1.0
    k_eq_v_layers: str = ""  # k-eq-v-misapplied: "global" or "all" layers use k_proj's output as the values
    kv_share_first_of_type: bool = False  # kv-share-source: shared layers read the FIRST producer of their type
    ple_scale_missing: str = ""  # ple-scale: "combine" drops the 2^-0.5, "table" the sqrt(P) of the PLE table
    ple_before_mlp: bool = False  # ple-placement: the PLE branch added after attention, before the MLP
    layer_scalar_mode: str = "end"  # layer-scalar-*: "missing" (never applied), "start" (the residual entering
    # the block is scaled, before the block's additions), "end" (Gemma 4: the block's output)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit activations, the dtype itself otherwise (never downcast fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _island(dtype: torch.dtype, opts: "PortOptions") -> torch.dtype:
    """The dtype of a norm, softmax or rotary table: float32 with `float32_islands` (HF), else _compute_dtype."""
    return torch.float32 if opts.float32_islands else _compute_dtype(dtype)


def _rms(xc: torch.Tensor, eps: float, opts: "PortOptions") -> torch.Tensor:
    ms = xc.pow(2).mean(-1, keepdim=True) + eps
    return xc * (torch.pow(ms, -0.5) if opts.float32_islands else torch.rsqrt(ms))  # HF Gemma 4 writes pow


class Tap(nn.Identity):
    """A named point in forward whose value a forward hook can record.

    Used for values that no sub-module produces on its own (the scaled
    embedding, post-RoPE q and k, attention probabilities).
    """


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, unit_offset: bool, opts: PortOptions) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps, self.unit_offset, self.opts = eps, unit_offset, opts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        cdt = _island(dtype, self.opts)
        xc = x.to(cdt)
        normed = _rms(xc, self.eps, self.opts)
        w = self.weight
        if self.unit_offset:
            # Gemma stores w centred on 0; (1 + w) in the parameter dtype rounds in bf16
            scale = (1 + w).to(cdt) if self.opts.offset_lowp else 1 + w.to(cdt)
        else:
            scale = w.to(cdt)
        if self.opts.norm_cast == "before":  # Llama order: round, then multiply in low precision
            return normed.to(dtype) * scale.to(dtype)
        return (normed * scale).to(dtype)


class ScalelessNorm(nn.Module):
    """RMSNorm without a weight (Gemma 4's v_norm and router norm)."""

    def __init__(self, eps: float, opts: PortOptions) -> None:
        super().__init__()
        self.eps, self.opts = eps, opts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x.to(_island(x.dtype, self.opts)), self.eps, self.opts).to(x.dtype)


class SkippedNorm(RMSNorm):
    """Holds the norm's weight (so the checkpoint still loads) but returns its input: a fault."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class GeluOpByOp(nn.Module):
    """tanh-GELU evaluated op by op in the input dtype, in jax.nn.gelu's order.

    Each op rounds to the input dtype, as JAX does on bf16 inputs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.tensor(math.sqrt(2 / math.pi), dtype=x.dtype)
        cube = x * x * x
        inner = c * (x + torch.tensor(0.044715, dtype=x.dtype) * cube)
        cdf = torch.tensor(0.5, dtype=x.dtype) * (1 + torch.tanh(inner))
        return x * cdf


class Linear(nn.Linear):
    """nn.Linear, or with `accum_split` two half-width partial products rounded to the dtype and added.

    Another library's matmul sums in another order (XLA's blocking, a fused kernel, low-precision
    accumulation): the split is one such order, as correct as the plain one.
    """

    def __init__(self, fan_in: int, fan_out: int, opts: PortOptions) -> None:
        super().__init__(fan_in, fan_out, bias=False)
        self.split = opts.accum_split and fan_in >= 2
        self.act_quant = opts.act_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant:
            x = round_activations(x, self.act_quant)
        if not self.split:
            return super().forward(x)
        h = self.in_features // 2
        return F.linear(x[..., :h], self.weight[:, :h]) + F.linear(x[..., h:], self.weight[:, h:])


def round_activations(x: torch.Tensor, kind: str) -> torch.Tensor:
    """`x` as a quantized runtime's matmul reads it (parity.numerics.act_quant.round_rows), back in x's dtype."""
    from parity.numerics.act_quant import round_rows

    got = round_rows(x.detach().to(torch.float32).cpu().numpy(), kind)
    return torch.from_numpy(got).to(x.dtype)


def kv_stored(x, opts: PortOptions):
    """Keys or values as a KV cache of type `opts.kv_round` stores them (rounded as they enter it, so the cache
    taps and a decode's cache hold the stored values); unchanged without it."""
    return round_activations(x, opts.kv_round) if opts.kv_round else x


def kv_query(q, opts: PortOptions):
    """q as the product with such keys reads it: ggml converts the query to the cached keys' vec_dot type (f16
    for an f16 cache, q8_0 for q4_0), mlx keeps it float; unchanged without a kv_round."""
    from parity.numerics.act_quant import query_kind

    kind = query_kind(opts.kv_round) if opts.kv_round else None
    return round_activations(q, kind) if kind else q


def kv_probs(probs, opts: PortOptions):
    """The probabilities as the product with a float cache's V reads them (converted to its type); a quantized
    cache's V is dequantized to float32 instead (ggml's flash-attention path), the probabilities kept."""
    from parity.numerics.act_quant import act_quant

    if not opts.kv_round or act_quant(opts.kv_round).block:
        return probs
    return round_activations(probs, opts.kv_round)


class GemmaMLP(nn.Module):
    """GeGLU: two half-width projections, gelu(gate) * up, then down."""

    def __init__(self, s: GemmaSpec, opts: PortOptions, width: int | None = None) -> None:
        super().__init__()
        width = width or s.intermediate_size
        self.fc_1 = Linear(s.hidden_size, width, opts)  # gate
        self.fc_2 = Linear(s.hidden_size, width, opts)  # up
        self.proj = Linear(width, s.hidden_size, opts)  # down
        self.act = GeluOpByOp() if opts.gelu_lowp else nn.GELU(approximate=s.gelu_approximate)
        self.swapped = opts.geglu_swapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc_1(x), self.fc_2(x)
        if self.swapped:
            gate, up = up, gate
        return self.proj(self.act(gate) * up)


def rope_cache(s: GemmaSpec, layer: int, T: int, dtype: torch.dtype, opts: PortOptions, positions=None):
    """cos, sin of shape [T, head_dim] for one layer's base and scaling factor (at `positions`, default 0..T-1).

    Proportional RoPE (Gemma 4 global layers, rope_proportion < 1): the first int(p * hd // 2) frequencies are
    theta^(-2j/hd) over the FULL head dim and the rest are 0 (those pairs pass through), still half-split over
    the whole head. `rope_ordinary_partial` builds the other thing instead: a table over r = p * hd dims only,
    frequencies over r, which `rotate` applies to the first r dims (a fault).
    """
    base, factor = s.rope_base_for(layer), s.rope_factor_for(layer)
    if opts.rope_scaling_local:
        factor = s.rope_scaling_factor
    hd, prop = s.head_dim_for(layer), s.rope_proportion_for(layer)
    adt = dtype if opts.rope_lowp else _island(dtype, opts)
    if prop < 1 and opts.rope_ordinary_partial:
        hd = int(prop * hd) // 2 * 2  # the rotated width r, pairs (i, i + r/2)
    idx = torch.arange(0, hd, 2, dtype=torch.int64).to(adt)
    inv_freq = 1.0 / (base ** (idx / hd))  # [hd / 2]
    if prop < 1 and not opts.rope_ordinary_partial:
        inv_freq[int(prop * hd // 2):] = 0  # zero-padded: those dims keep angle 0 (cos 1, sin 0)
    if positions is None:
        positions = torch.arange(T, dtype=torch.int64)
    pos = positions.to(adt) / factor  # linear scaling divides positions
    angles = torch.outer(pos, inv_freq)  # [T, head_dim / 2]
    emb = torch.cat([angles, angles], dim=-1)  # [T, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """apply_rope over the first cos.shape[-1] dims of x, the rest passed through (ordinary partial RoPE when the
    table is narrower than the head; otherwise apply_rope itself)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return apply_rope(x, cos, sin, layout)
    return torch.cat([apply_rope(x[..., :r], cos, sin, layout), x[..., r:]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """x: [B, heads, T, head_dim]. Half-split pairs dim i with dim i + head_dim/2."""
    if layout == "interleaved":  # pairs (0,1), (2,3), ...: the rope-layout fault
        x1, x2 = x[..., 0::2], x[..., 1::2]
        c, s_ = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
        out = torch.stack([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1)  # [..., hd/2, 2]
        return out.flatten(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, s: GemmaSpec, layer: int, opts: PortOptions) -> None:
        super().__init__()
        self.s, self.layer, self.opts = s, layer, opts
        # fused qkv, litgpt layout: per kv group, its query heads, then its key head, then its value head
        self.attn = Linear(s.hidden_size, (s.num_heads + 2 * s.num_kv_heads) * s.head_dim, opts)
        self.proj = Linear(s.num_heads * s.head_dim, s.hidden_size, opts)
        if s.qk_norm:
            qk = SkippedNorm if opts.skip_qk_norm else RMSNorm
            self.norm_q = qk(s.head_dim, s.norm_eps, s.norm_unit_offset, opts)
            self.norm_k = qk(s.head_dim, s.norm_eps, s.norm_unit_offset, opts)
        else:
            self.norm_q = self.norm_k = nn.Identity()
        self.q_rot, self.k_rot, self.scores, self.probs = Tap(), Tap(), Tap(), Tap()
        self.v_out = Tap()  # the values as the cache stores them

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: "LayerCache | None" = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        s = self.s
        B, T, _ = x.shape
        q_per_kv = s.num_heads // s.num_kv_heads
        qkv = self.attn(x).view(B, T, s.num_kv_heads, q_per_kv + 2, s.head_dim)
        q = qkv[:, :, :, :q_per_kv].reshape(B, T, s.num_heads, s.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = qkv[:, :, :, q_per_kv].transpose(1, 2)  # [B, KV, T, hd]
        v = qkv[:, :, :, q_per_kv + 1].transpose(1, 2)  # [B, KV, T, hd]
        if not self.opts.qk_norm_after_rope:
            q, k = self.norm_q(q), self.norm_k(k)
        q = self.q_rot(apply_rope(q, cos, sin, self.opts.rope_layout))
        k = self.k_rot(kv_stored(apply_rope(k, cos, sin, self.opts.rope_layout), self.opts))
        if self.opts.qk_norm_after_rope:
            q, k = self.norm_q(q), self.norm_k(k)
        v = self.v_out(kv_stored(v, self.opts))
        if cache is not None:  # attend over what the cache holds plus the new keys, then store the new ones
            k, v, mask = cache.attend(k, v, positions)  # [B, KV, L, hd] x2, [T, L]
        q = kv_query(q, self.opts)
        k = k.repeat_interleave(q_per_kv, dim=1)  # [B, H, T, hd]
        v = v.repeat_interleave(q_per_kv, dim=1)  # [B, H, T, hd]
        if self.opts.scale_q_first:  # q rounded after scaling, then q.k
            scores = (q * torch.tensor(s.query_scale, dtype=q.dtype)) @ k.transpose(-1, -2)  # [B, H, T, T]
        else:
            scores = (q @ k.transpose(-1, -2)) * s.query_scale  # [B, H, T, T]
        if s.attn_softcap is not None:
            scores = torch.tanh(scores / s.attn_softcap) * s.attn_softcap
        scores = self.scores(scores + mask.to(scores.dtype))
        if self.opts.softmax_lowp:  # op by op in the activation dtype, each op rounded
            e = torch.exp(scores - scores.amax(-1, keepdim=True))
            probs = self.probs(e / e.sum(-1, keepdim=True))
        else:
            probs = self.probs(F.softmax(scores.to(_compute_dtype(scores.dtype)), dim=-1).to(q.dtype))
        probs = kv_probs(probs, self.opts)
        y = (probs @ v).transpose(1, 2).reshape(B, T, s.num_heads * s.head_dim)  # [B, T, H * hd]
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, s: GemmaSpec, layer: int, opts: PortOptions) -> None:
        super().__init__()
        sandwich = s.norm_placement == "sandwich"
        norm = lambda: RMSNorm(s.hidden_size, s.norm_eps, s.norm_unit_offset, opts)  # noqa: E731
        self.norm_1 = norm()
        self.attn = CausalSelfAttention(s, layer, opts)
        self.post_attention_norm = norm() if sandwich else nn.Identity()
        self.norm_2 = norm()
        self.mlp = GemmaMLP(s, opts)
        self.post_mlp_norm = norm() if sandwich else nn.Identity()
        if opts.extra_post_norms and not sandwich:
            # tied to the pre-norms' weights, so the same checkpoint loads
            self.post_attention_norm, self.post_mlp_norm = norm(), norm()
            self.post_attention_norm.weight, self.post_mlp_norm.weight = self.norm_1.weight, self.norm_2.weight

    def forward(self, x, cos, sin, mask, cache=None, positions=None):
        x = x + self.post_attention_norm(self.attn(self.norm_1(x), cos, sin, mask, cache, positions))
        return x + self.post_mlp_norm(self.mlp(self.norm_2(x)))


class Gemma4Attention(nn.Module):
    """Gemma 4 attention: separate q/k/v projections with this layer's head dim and KV heads, q/k norms (with
    weights) and v norm (without) per head before RoPE, K=V on global layers (k_proj's output is the values too,
    v-normed, not roped), and on KV-shared layers no k/v at all: the source layer's keys, values and mask."""

    def __init__(self, s: GemmaSpec, layer: int, opts: PortOptions) -> None:
        super().__init__()
        self.s, self.layer, self.opts = s, layer, opts
        self.hd, self.kv = s.head_dim_for(layer), s.kv_heads_for(layer)
        self.shared = s.kv_source(layer) != layer
        self.k_eq_v = s.k_eq_v_for(layer) or opts.k_eq_v_layers == "all" or (
            opts.k_eq_v_layers == "global" and s.layer_types[layer] == "global")
        # 1.0 for Gemma 4; the attn-scale fault scales by this layer's own head dim
        self.scale = self.hd ** -0.5 if opts.attn_scale_head_dim else s.query_scale
        self.q_proj = Linear(s.hidden_size, s.num_heads * self.hd, opts)
        self.proj = Linear(s.num_heads * self.hd, s.hidden_size, opts)  # o_proj
        qk = SkippedNorm if opts.skip_qk_norm else RMSNorm
        self.norm_q = qk(self.hd, s.norm_eps, s.norm_unit_offset, opts) if s.qk_norm else nn.Identity()
        if not self.shared:
            self.k_proj = Linear(s.hidden_size, self.kv * self.hd, opts)
            if not s.k_eq_v_for(layer):  # (a K=V fault keeps v_proj, so the checkpoint loads, and ignores it)
                self.v_proj = Linear(s.hidden_size, self.kv * self.hd, opts)
            self.norm_k = qk(self.hd, s.norm_eps, s.norm_unit_offset, opts) if s.qk_norm else nn.Identity()
            self.norm_v = ScalelessNorm(s.norm_eps, opts) if s.v_norm else nn.Identity()
        self.q_rot, self.k_rot, self.scores, self.probs = Tap(), Tap(), Tap(), Tap()
        self.v_out = Tap()

    def forward(self, x, cos, sin, mask, cache=None, positions=None, shared_kv: dict | None = None):
        s, B, T = self.s, x.shape[0], x.shape[1]
        layout = self.opts.rope_layout
        q = self.norm_q(self.q_proj(x).view(B, T, s.num_heads, self.hd)).transpose(1, 2)  # [B, H, T, hd]
        q = self.q_rot(rotate(q, cos, sin, layout))
        if self.shared:  # the source layer's keys and values of this step (its cache plus the new ones) and mask
            k, v, mask = shared_kv[s.layer_types[self.layer]]
        else:
            raw = self.k_proj(x).view(B, T, self.kv, self.hd)  # [B, T, KV, hd]
            v = raw if self.k_eq_v else self.v_proj(x).view(B, T, self.kv, self.hd)
            k = self.k_rot(kv_stored(rotate(self.norm_k(raw).transpose(1, 2), cos, sin, layout), self.opts))
            v = self.v_out(kv_stored(self.norm_v(v).transpose(1, 2), self.opts))  # [B, KV, T, hd] both
            if cache is not None:
                k, v, mask = cache.attend(k, v, positions)  # [B, KV, L, hd] x2, [T, L]
            if shared_kv is not None and not (self.opts.kv_share_first_of_type and s.layer_types[self.layer]
                                              in shared_kv):
                shared_kv[s.layer_types[self.layer]] = (k, v, mask)  # the last of its type before the split wins
        q = kv_query(q, self.opts)
        group = s.num_heads // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, H, L, hd]
        if self.opts.scale_q_first:
            scores = (q * torch.tensor(self.scale, dtype=q.dtype)) @ k.transpose(-1, -2)  # [B, H, T, L]
        else:
            scores = (q @ k.transpose(-1, -2)) * self.scale  # [B, H, T, L]
        if s.attn_softcap is not None:
            scores = torch.tanh(scores / s.attn_softcap) * s.attn_softcap
        scores = self.scores(scores + mask.to(scores.dtype))
        if self.opts.softmax_lowp:
            e = torch.exp(scores - scores.amax(-1, keepdim=True))
            probs = self.probs(e / e.sum(-1, keepdim=True))
        else:
            probs = self.probs(F.softmax(scores.to(_island(scores.dtype, self.opts)), dim=-1).to(q.dtype))
        probs = kv_probs(probs, self.opts)
        y = (probs @ v).transpose(1, 2).reshape(B, T, s.num_heads * self.hd)  # [B, T, H * hd]
        return self.proj(y)


class Router(nn.Module):
    """Gemma 4's router: scale-less RMSNorm, times a learned scale and D^-0.5, a projection to the experts,
    softmax over all of them, the top k (in descending probability), renormalised to sum to 1."""

    def __init__(self, s: GemmaSpec, opts: PortOptions, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.norm = ScalelessNorm(s.norm_eps, opts)
        self.scale = nn.Parameter(torch.zeros(s.hidden_size))
        self.proj = Linear(s.hidden_size, s.num_experts, opts)
        self.per_expert_scale = nn.Parameter(torch.zeros(s.num_experts))
        self.k, self.root, self.opts = s.top_k_experts, s.hidden_size ** -0.5, opts
        self.logits, self.probs, self.chosen, self.weights = Tap(), Tap(), Tap(), Tap()

    def forward(self, h: torch.Tensor):
        logits = self.logits(self.proj(self.norm(h) * self.scale * self.root))  # [B, T, E]
        probs = F.softmax(logits.to(_island(logits.dtype, self.opts)), dim=-1)  # [B, T, E]
        if self.opts.router_lowp:  # rounded before the top k, as keras-hub does in bf16 (tapped as rounded)
            probs = probs.to(_dtype_named(self.opts.router_lowp)).to(probs.dtype)
        ranked = self.probs(probs)
        top, idx = torch.topk(ranked, self.k, dim=-1)  # [B, T, k] each, descending
        if self.opts.route_override:
            top, idx = _forced(ranked, idx, self.layer, self.opts.route_override)
        self.chosen(idx.to(torch.float64))
        top = top.to(probs.dtype)
        w = self.weights(top if self.opts.router_no_renorm else top / top.sum(-1, keepdim=True))  # [B, T, k]
        if self.opts.expert_scale != "weights":
            return w, idx  # the scale goes to the experts' input, or nowhere
        return w * self.per_expert_scale[idx], idx  # promoted: a float32 weight times a float64 scale stays float64


def _dtype_named(name: str) -> torch.dtype:
    return getattr(torch, name)


def _forced(probs: torch.Tensor, idx: torch.Tensor, layer: int, overrides: tuple):
    """idx with the overridden tokens' experts replaced ([B, T, k], B = 1: tokens are positions), each row in
    descending probability; and those experts' probabilities."""
    idx = idx.clone()
    for (at, token), ids in overrides:
        if at == layer:
            row = torch.tensor(ids, dtype=idx.dtype)
            order = torch.argsort(probs[0, token, row], descending=True)
            idx[0, token] = row[order]
    return probs.gather(-1, idx), idx


class Experts(nn.Module):
    """E GeGLU experts stored as HF stores them: gate_up [E, 2I, D] (gate rows first), down [E, D, I]."""

    def __init__(self, s: GemmaSpec, opts: PortOptions) -> None:
        super().__init__()
        e, i, d = s.num_experts, s.expert_intermediate_size, s.hidden_size
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.zeros(e, d, i))
        self.act = GeluOpByOp() if opts.gelu_lowp else nn.GELU(approximate=s.gelu_approximate)
        self.swapped = opts.geglu_swapped or opts.expert_gate_up == "up-gate"
        self.scale_at = opts.expert_scale

    def forward(self, m: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """m: [N, D] normed inputs; weights, idx: [N, k] -> [N, D], each chosen expert's output times its weight.
        `scale`: the per-expert scale [E], for the misplaced-scale fault only (Gemma scales the weights)."""
        out = torch.zeros_like(m)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)  # tokens routed to e, and where e sits in their top k
            x = m[tok] * scale[e].to(m.dtype) if self.scale_at == "input" else m[tok]
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
            if self.swapped:
                gate, up = up, gate
            y = F.linear(self.act(gate) * up, self.down_proj[e])  # [n, D]
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        return out


class Gemma4Block(nn.Module):
    """One Gemma 4 block: sandwich-normed attention; the dense MLP (with MoE: beside the experts, each branch
    normed, summed, normed again); the per-layer-embedding branch; the layer scalar."""

    def __init__(self, s: GemmaSpec, layer: int, opts: PortOptions) -> None:
        super().__init__()
        norm = lambda size=s.hidden_size: RMSNorm(size, s.norm_eps, s.norm_unit_offset, opts)  # noqa: E731
        self.layer, self.moe, self.ple = layer, bool(s.num_experts), bool(s.ple_dim)
        self.norm_1, self.attn, self.post_attention_norm = norm(), Gemma4Attention(s, layer, opts), norm()
        self.norm_2, self.mlp, self.post_mlp_norm = norm(), GemmaMLP(s, opts, s.mlp_width_for(layer)), norm()
        if self.moe:
            self.post_dense_norm, self.router, self.norm_moe = norm(), Router(s, opts, layer), norm()
            self.experts, self.post_moe_norm = Experts(s, opts), norm()
            self.dense_tap, self.moe_tap = Tap(), Tap()
        if self.ple:
            self.ple_in = Tap()
            self.ple_gate = Linear(s.hidden_size, s.ple_dim, opts)
            self.ple_act = GeluOpByOp() if opts.gelu_lowp else nn.GELU(approximate=s.gelu_approximate)
            self.ple_up = Linear(s.ple_dim, s.hidden_size, opts)
            self.post_ple_norm = norm()
        self.layer_scalar = nn.Parameter(torch.zeros(1)) if s.layer_scalar else None
        self.pre_scalar = Tap()
        self.ple_before_mlp, self.scalar_mode = opts.ple_before_mlp, opts.layer_scalar_mode

    def _ple(self, x, per_layer):
        g = self.ple_act(self.ple_gate(x)) * self.ple_in(per_layer)  # [B, T, P]
        return x + self.post_ple_norm(self.ple_up(g))

    def forward(self, x, cos, sin, mask, cache=None, positions=None, shared_kv=None, per_layer=None):
        if self.layer_scalar is not None and self.scalar_mode == "start":  # a fault: the residual scaled first
            x = x * self.layer_scalar.to(x.dtype)
        x = x + self.post_attention_norm(self.attn(self.norm_1(x), cos, sin, mask, cache, positions, shared_kv))
        if self.ple and self.ple_before_mlp:  # a fault: the PLE branch reads the post-attention residual
            x = self._ple(x, per_layer)
        y = self.mlp(self.norm_2(x))
        if self.moe:  # the router reads the un-normed residual; the experts their own pre-norm of it
            B, T, D = x.shape
            weights, idx = self.router(x)
            m = self.norm_moe(x).reshape(B * T, D)
            experts = self.experts(m, weights.reshape(B * T, -1), idx.reshape(B * T, -1),
                                   self.router.per_expert_scale).reshape(B, T, D)
            y = self.dense_tap(self.post_dense_norm(y)) + self.moe_tap(self.post_moe_norm(experts))
        x = x + self.post_mlp_norm(y)
        if self.ple and not self.ple_before_mlp:
            x = self._ple(x, per_layer)
        if self.layer_scalar is None or self.scalar_mode != "end":
            return self.pre_scalar(x) if self.layer_scalar is not None else x
        return self.pre_scalar(x) * self.layer_scalar.to(x.dtype)


class PerLayerInputs(nn.Module):
    """Gemma 4's per-layer embeddings: [B, T, L, P] = (norm(proj(x) * D^-0.5) + table(ids) * sqrt(P)) * 2^-0.5,
    ids at or beyond the table's rows read row 0 (GEMMA4.md "PLE")."""

    def __init__(self, s: GemmaSpec, opts: PortOptions) -> None:
        super().__init__()
        self.s, self.rows, self.opts = s, s.ple_rows, opts
        self.ple_embed = nn.Embedding(s.ple_rows, s.num_layers * s.ple_dim)
        self.ple_proj = Linear(s.hidden_size, s.num_layers * s.ple_dim, opts)
        self.ple_norm = RMSNorm(s.ple_dim, s.norm_eps, s.norm_unit_offset, opts)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s, (B, T) = self.s, ids.shape
        ids = torch.where(ids < self.rows, ids, torch.zeros_like(ids))
        scale = float(np.float32(math.sqrt(s.ple_dim))) if self.opts.float32_islands else math.sqrt(s.ple_dim)
        if self.opts.ple_scale_missing == "table":  # a fault: the table read without its sqrt(P)
            scale = 1.0
        tok = self.ple_embed(ids) * torch.tensor(scale, dtype=x.dtype)  # the scale rounded to the dtype (HF: a float32 buffer first)
        tok = tok.view(B, T, s.num_layers, s.ple_dim)  # [B, T, L, P]
        ctx = (self.ple_proj(x) * s.hidden_size ** -0.5).view(B, T, s.num_layers, s.ple_dim)  # [B, T, L, P]
        if self.opts.ple_scale_missing == "combine":  # a fault: the sum not scaled by 2^-0.5
            return self.ple_norm(ctx) + tok
        return (self.ple_norm(ctx) + tok) * 2 ** -0.5


class EmbedScale(nn.Module):
    def __init__(self, s: GemmaSpec, perturb_seed: int | None = None, float32_islands: bool = False) -> None:
        super().__init__()
        self.normalizer, self.in_fp32 = s.embed_normalizer, s.embed_scale_dtype == "float32"
        if float32_islands:  # HF keeps sqrt(hidden) in a float32 buffer: float32's value, also in float64
            self.normalizer = float(np.float32(self.normalizer))
        if s.embed_scale_dtype == "bfloat16":  # a constant rounded to bf16 whatever the activations are
            import ml_dtypes  # numpy, not torch: the model is built on the meta device

            self.normalizer = float(np.asarray(self.normalizer).astype(ml_dtypes.bfloat16))
        self.perturb_seed = perturb_seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_fp32:  # the normaliser kept in fp32, the product rounded once
            y = (x.to(_compute_dtype(x.dtype)) * self.normalizer).to(x.dtype)
        else:
            y = x * torch.tensor(self.normalizer, dtype=x.dtype)  # rounded to the activation dtype first
        if self.perturb_seed is None:
            return y
        # every element one ulp up or down (nextafter in the dtype): an input change the size of one rounding
        g = torch.Generator().manual_seed(self.perturb_seed)
        up = torch.rand(y.shape, generator=g) < 0.5
        inf = torch.tensor(float("inf"), dtype=y.dtype)
        return torch.where(up, torch.nextafter(y, inf), torch.nextafter(y, -inf))


class Softcap(nn.Module):
    def __init__(self, cap: float) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / self.cap) * self.cap


def causal_mask(T: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """[T, T] additive mask: query i sees key j when 0 <= i - j < window."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    ok = j <= i
    if window is not None:
        ok &= (i - j) < window
    return torch.zeros(T, T, dtype=dtype).masked_fill(~ok, float("-inf"))


class LayerCache:
    """One layer's KV cache: every position for a global layer, a ring of `window` slots for a local one
    (as Gemma's reference implementation keeps it), so a long decode wraps the ring.

    `attend` returns the cached entries plus the new ones with the additive mask for the new queries, then
    stores the new ones; a prefill longer than the window attends over all of its own keys and keeps the last
    `window`. Slot positions are bookkept by the ring formula (slot = position mod window).
    """

    def __init__(self, window: int | None, global_window: int | None, opts: PortOptions) -> None:
        self.window, self.opts = window, opts
        self.mask_window = window if window is not None else (global_window if opts.decode_mask_global_window
                                                              else None)
        self.k = self.v = None  # [B, KV, L, hd]
        self.pos = torch.zeros(0, dtype=torch.int64)  # [L] the position each slot holds

    def attend(self, k, v, positions):
        decoding = self.k is not None and k.shape[2] == 1
        if self.opts.decode_kv_quant:  # what a rounding cache hands back: the keys and values as it stores them
            k, v = round_activations(k, self.opts.decode_kv_quant), round_activations(v, self.opts.decode_kv_quant)
        keys = k if self.k is None else torch.cat([self.k, k], 2)  # [B, KV, L, hd]
        values = v if self.v is None else torch.cat([self.v, v], 2)
        kpos = torch.cat([self.pos, positions])  # [L]
        window = self.mask_window if decoding else self.window
        if decoding and window is not None and self.window is not None:
            window += self.opts.decode_window
        rel = positions[:, None] - kpos[None, :]  # [T, L]
        ok = rel >= 0
        if window is not None:
            ok &= rel < window
        mask = torch.zeros(ok.shape, dtype=_compute_dtype(k.dtype)).masked_fill(~ok, float("-inf"))
        if self.opts.prefill_mask_added_as_bool and not decoding:
            mask = ok.to(_compute_dtype(k.dtype))  # +1 where allowed, +0 (not -inf) where masked
        self._store(k, v, positions, decoding)
        self.key_positions = kpos
        return keys, values, mask

    def _store(self, k, v, positions, decoding: bool) -> None:
        if self.window is None:
            self.k = k if self.k is None else torch.cat([self.k, k], 2)
            self.v = v if self.v is None else torch.cat([self.v, v], 2)
            self.pos = torch.cat([self.pos, positions])
            return
        size = self.window + max(self.opts.decode_window, 0)  # a window fault that sees one more needs one more slot
        if self.k is None:
            B, KV, _, hd = k.shape
            self.k = torch.zeros(B, KV, 0, hd, dtype=k.dtype)
            self.v = torch.zeros(B, KV, 0, hd, dtype=v.dtype)
        for t in range(k.shape[2]):  # one position at a time, as a decode writes them
            p = int(positions[t])
            if self.k.shape[2] < size:  # the ring is still filling
                self.k = torch.cat([self.k, k[:, :, t:t + 1]], 2)
                self.v = torch.cat([self.v, v[:, :, t:t + 1]], 2)
                self.pos = torch.cat([self.pos, positions[t:t + 1]])
                continue
            slot = p % size
            data = (slot + 1) % size if decoding and self.opts.decode_stale else slot
            self.k[:, :, data], self.v[:, :, data] = k[:, :, t], v[:, :, t]
            self.pos[slot] = p


class KVCache:
    """The port's cache: one LayerCache per layer and the number of positions already seen."""

    def __init__(self, s: GemmaSpec, opts: PortOptions) -> None:
        self.layers = [LayerCache(s.window_for(i), s.sliding_window, opts) for i in range(s.num_layers)]
        for i in range(s.num_layers):  # a KV-shared layer keeps no cache: it reads (and shows) its source's
            self.layers[i] = self.layers[s.kv_source(i)]
        self.length = 0


class GPT(nn.Module):
    def __init__(self, s: GemmaSpec, opts: PortOptions = PortOptions()) -> None:
        super().__init__()
        self.s, self.opts = s, opts
        self.wte = nn.Embedding(s.vocab_size, s.hidden_size)
        self.embed_scale = EmbedScale(s, opts.perturb_seed, opts.float32_islands)
        block = Gemma4Block if s.family == 4 else Block
        self.h = nn.ModuleList(block(s, i, opts) for i in range(s.num_layers))
        self.ple = PerLayerInputs(s, opts) if s.ple_dim else None
        self.ln_f = (RMSNorm if opts.final_norm else SkippedNorm)(s.hidden_size, s.norm_eps, s.norm_unit_offset, opts)
        self.lm_head = Linear(s.hidden_size, s.vocab_size, opts)
        if s.tied_head:
            self.lm_head.weight = self.wte.weight
        self.final_softcap = Softcap(s.final_softcap) if s.final_softcap else nn.Identity()
        self.logits_tap = Tap()  # the logits when the softcap is misplaced (the "logits" tap is the cap's output)
        self.rope_cos = Tap()  # layer 0's cos table, [1, T, head_dim], for the rope-precision probe

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: [B, T] token ids -> logits [B, T, vocab]. With `cache`, idx continues what it holds."""
        T = idx.shape[1]
        x = self.embed_scale(self.wte(idx))  # [B, T, hidden]
        dtype = x.dtype
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + T, dtype=torch.int64)
        rotated = positions  # the cache and the mask keep the true positions; a fault rotates elsewhere
        if cache is not None and start and self.opts.decode_pos_offset:
            rotated = positions + self.opts.decode_pos_offset
        extra = {}
        if self.s.family == 4:
            extra["shared_kv"] = {}  # layer type -> the keys, values and mask its last producer made this step
            ple = self.ple(idx, x) if self.ple is not None else None  # [B, T, L, P]
        for i, block in enumerate(self.h):
            cos, sin = rope_cache(self.s, i, T, dtype, self.opts, rotated)
            if i == 0:
                cos = self.rope_cos(cos[None])[0]
            if self.s.family == 4 and self.ple is not None:
                extra["per_layer"] = ple[:, :, i]
            if cache is None:
                x = block(x, cos, sin, causal_mask(T, self.s.window_for(i), _compute_dtype(dtype)), **extra)
            else:
                x = block(x, cos, sin, None, cache.layers[i], positions, **extra)
        if cache is not None:
            cache.length += T
        if self.opts.softcap_on_norm:  # the final norm's tap is before the cap; the head reads the capped norm
            return self.logits_tap(self.lm_head(self.final_softcap(self.ln_f(x))))
        return self.final_softcap(self.lm_head(self.ln_f(x)))
