"""LLaMA-style decoder (the shared autoregressive transformer of Janus).

Module names mirror HF ``LlamaForCausalLM`` so that the official ``language_model.*`` keys load
as they are. The model takes *embeddings* (text, image-understanding and image-generation
embeddings are mixed by the caller) and returns final-normed hidden states; the text head
(``lm_head``) and the image head live outside, so either can be applied.

Two ways to run it:
- training / one-shot: ``forward(x)`` with no cache -> causal attention over the whole sequence;
- decoding: ``setup_cache(B, S)`` preallocates a static KV cache; then ``forward(x, input_pos)``
  writes keys/values at ``input_pos`` (gpt-fast style, no Python-side growth of tensors).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalised in fp32 like HF Llama, cast back, then scaled (the same roundings as HF; one call
        # instead of five: a decode step runs 2 per layer)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos and *signed* sin tables for rotate-half RoPE at integer ``positions`` (any shape) -> (*pos, hd).

    HF's layout is non-interleaved: ``x * cos + cat(-x2, x1) * sin``. The sign of the first half is
    folded into the sin table (``[-sin, sin]``), so that ``apply_rope`` rotates with one ``roll``.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (*pos, hd/2)
    sin = freqs.sin()
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); cos / signed sin: (B, 1, T, hs). roll(x) = cat(x2, x1): with the signed sin the
    # same products as HF's cat(-x2, x1) * sin (negation is exact), in 4 ops instead of 7
    return (x * cos + x.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of every slot in the model's dtype. A cache also does the attention of the
    tokens it stores (``attend``), so that another storage (``zuoyou.kvcache``) comes from outside."""

    def __init__(self, batch: int, seq: int, n_kv: int, hs: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, seq, hs)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # k, v: (B, nkv, T, hs) written in place at the slots input_pos (T,)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v

    def attend(self, q, k, v, input_pos, mask=None):
        """Store k, v at ``input_pos``; attention of q over the stored slots -> (B, nh, T, hs)."""
        k, v = self.update(input_pos, k, v)  # (B, nkv, S, hs)
        if mask is not None and mask.shape[-1] < k.shape[2]:
            # the mask covers only the first slots (the ones written so far): attend over those
            # and skip reading the rest of the cache
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]  # (B, nkv, S', hs)
        return sdpa(q, k, v, mask)

    @property
    def rows(self) -> int:
        return self.k.shape[0]

    def select_rows(self, index: torch.Tensor) -> None:
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


def sdpa(q, k, v, mask=None):
    # q (B, nh, T, hs), k / v (B, nkv, S, hs); no mask = causal (T > 1) or all keys (T == 1)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.nh, self.nkv, self.hs = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hs, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hs, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hs, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hs, c.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None
        self.rope = apply_rope  # (a fused kernel may be swapped in from outside: ``zuoyou.fused``)

    def project(self, x):
        """q, k, v of x (B, T, C): (B, T, nh * hs), (B, T, nkv * hs) twice. (``zuoyou.fused`` may compute
        them in one call, from outside the model.)"""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            y = self.kv_cache.attend(q, k, v, input_pos, mask)  # (B, nh, T, hs)
        else:
            y = sdpa(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def project(self, x):
        """gate and up of x (B, T, C), each (B, T, I). (``zuoyou.fused`` may compute them in one call, from
        outside the model.)"""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, input_pos=None, mask=None, positions=None):
        """x: (B, T, C) embeddings -> (B, T, C) final-normed hidden states.

        input_pos: (T,) cache slots to write (decoding); None = no cache, plain causal attention.
        mask: (B, 1, T, S) bool, True = may attend (needed with a cache or with padding); with a cache,
            S may be shorter than the cache: keys beyond S are then not read.
        positions: (B, T) RoPE positions when they differ from input_pos (left-padded rows).
        """
        B, T, _ = x.shape
        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=x.device)
            positions = positions.expand(B, T)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, hs)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.config = c
        self.model = LlamaModel(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def setup_cache(self, batch: int, seq: int, dtype=None, device=None, cache=None):
        """Preallocate a static KV cache of ``seq`` slots for ``batch`` rows in every layer.
        ``cache``: the cache class (``KVCache``, keys and values in ``dtype``; or ``zuoyou.kvcache``'s)."""
        w = self.model.embed_tokens.weight
        dtype, device = dtype or w.dtype, device or w.device
        c = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = (cache or KVCache)(batch, seq, c.num_key_value_heads, c.head_dim, dtype, device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def caches(self) -> list:
        return [layer.self_attn.kv_cache for layer in self.model.layers]
