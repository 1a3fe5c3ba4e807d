"""A Gemma 1 written the way third-party libraries write one, and its adapter, built only from the README.

The implementation is independent of parity's port and has the patterns real
libraries use that forward hooks do not see directly:

- the GELU is a plain module-level function called inside the MLP's forward
  (tapped with `parity.adapters.torch_hooks.function_taps`);
- the head is tied as a function, `x @ embed.weight.T`, inside the model's
  forward (tapped as the model's return value, `("", "out")`);
- attention is called with keyword arguments only and the same tensor twice
  (`attn(query_input=h, key_input=h, ...)`), as cross-attention code is;
- the rotary cache is a buffer the library builds itself, kept in float32
  when the model is cast (as `from_pretrained(dtype=...)` keeps inv_freq).

`tests/test_third_party.py` runs it in both modes and dtypes through the harness.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from parity.adapters.base import Adapter, RunResult
from parity.adapters.torch_hooks import function_taps, module_feeds, recording
from parity.model.taps import expand_tap_map
from parity.model.weights import map_weights


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class Norm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(n)), eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class Attention(nn.Module):
    def __init__(self, s) -> None:
        super().__init__()
        self.s = s
        self.wq = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=False)
        self.wk = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False)
        self.wv = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False)
        self.wo = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=False)

    @staticmethod
    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def forward(self, *, query_input, key_input, cos, sin):
        s, (B, T, _) = self.s, query_input.shape
        q = self.wq(query_input).view(B, T, s.num_heads, s.head_dim).transpose(1, 2)  # [B, n, T, hd]
        k = self.wk(key_input).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)  # [B, kv, T, hd]
        v = self.wv(key_input).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)  # [B, kv, T, hd]
        cos, sin = cos[:T].to(q.dtype), sin[:T].to(q.dtype)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        rep = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [B, n, T, hd]
        scores = (q @ k.transpose(-1, -2)).float() * s.query_scale  # [B, n, T, T]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        probs = scores.softmax(-1).to(q.dtype)
        return self.wo((probs @ v).transpose(1, 2).reshape(B, T, -1))  # [B, T, n * hd] -> [B, T, H]


class MLP(nn.Module):
    def __init__(self, s) -> None:
        super().__init__()
        self.gate = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down(gelu_tanh(self.gate(x)) * self.up(x))


class Layer(nn.Module):
    def __init__(self, s) -> None:
        super().__init__()
        self.in_norm, self.attn = Norm(s.hidden_size, s.norm_eps), Attention(s)
        self.mlp_norm, self.mlp = Norm(s.hidden_size, s.norm_eps), MLP(s)

    def forward(self, x, cos, sin):
        h = self.in_norm(x)
        x = x + self.attn(query_input=h, key_input=h, cos=cos, sin=sin)
        return x + self.mlp(self.mlp_norm(x))


class Gemma(nn.Module):
    def __init__(self, s) -> None:
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.num_layers))
        self.norm = Norm(s.hidden_size, s.norm_eps)
        self.register_buffer("cos", torch.zeros(0), persistent=False)
        self.register_buffer("sin", torch.zeros(0), persistent=False)

    def build_rope(self) -> None:
        """The library's own rotary cache, in float32 whatever the model's dtype."""
        s = self.s
        inv = 1.0 / (s.rope_base ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim))
        ang = torch.outer(torch.arange(s.max_position, dtype=torch.float32), inv)  # [P, hd / 2]
        emb = torch.cat([ang, ang], -1)  # [P, hd]
        self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, ids):
        x = self.embed(ids)
        x = x * torch.tensor(math.sqrt(self.s.hidden_size), dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return self.norm(x) @ self.embed.weight.T  # a tied head, as a function


NAME_MAP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.in_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.wo.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",  # Gemma 1: the pre-MLP norm
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down.weight",
    "model.norm.weight": "norm.weight",
}
TAP_MAP = {
    "embed": ("layers.0", "in"),
    "layers.{}.attn_norm": ("layers.{}.in_norm", "out"),
    "layers.{}.attn": ("layers.{}.attn", "out"),
    "layers.{}.attn_residual": ("layers.{}.mlp_norm", "in"),
    "layers.{}.mlp_norm": ("layers.{}.mlp_norm", "out"),
    "layers.{}.mlp.gate": ("layers.{}.mlp.gate", "out"),
    "layers.{}.mlp.up": ("layers.{}.mlp.up", "out"),
    "layers.{}.mlp.hidden": ("layers.{}.mlp.down", "in"),
    "layers.{}.mlp": ("layers.{}.mlp", "out"),
    "layers.{}.out": ("layers.{}", "out"),
    "final_norm": ("norm", "out"),
    "logits": ("", "out"),  # the model's return value
}


class ThirdPartyGemma(Adapter):
    name = "third-party-gemma"

    def version(self):
        return "third-party-gemma 0.1 (tests)"

    def check(self, spec, dtype):
        from parity.errors import Unsupported

        if spec.family != 1 or spec.gelu_approximate != "tanh":
            raise Unsupported("third-party-gemma implements Gemma 1 with tanh GELU only")

    def build(self, spec, weights, dtype):
        model = Gemma(spec)
        params = {k: tuple(v.shape) for k, v in model.named_parameters()}
        for k, t in map_weights(weights.tensors, NAME_MAP, params, where=self.name).items():
            model.get_parameter(k).data.copy_(torch.from_numpy(t))
        model = model.to(getattr(torch, dtype)).eval()
        model.build_rope()  # after the cast: the rotary cache stays float32
        return model

    def run(self, model, tokens, feed=None):
        spec = model.s
        tap_map = expand_tap_map(TAP_MAP, spec)
        acts = {f"layers.{i}.mlp.act": f"layers.{i}.mlp" for i in range(spec.num_layers)}
        with torch.no_grad(), recording(model, tap_map, module_feeds(tap_map, feed, self.name)) as taps, \
                function_taps(sys.modules[__name__], "gelu_tanh", acts, model, taps):
            model(torch.tensor([tokens]))
        return RunResult(dict(taps))


def adapter():
    return ThirdPartyGemma()
