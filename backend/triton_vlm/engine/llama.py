"""A Llama-family decoder (Llama, Mistral, Qwen2) that reads and writes a paged KV cache.

Tokens of every sequence in a step are flattened into one [T, hidden] batch; only attention
needs to know where one sequence ends and the next begins (see attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import TextGeometry
from .attention import AttentionMetadata, paged_attention, write_kv

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    def __init__(self, g: TextGeometry):
        super().__init__()
        inv_freq = 1.0 / (g.rope_theta ** (torch.arange(0, g.head_dim, 2, dtype=torch.int64).float() / g.head_dim))
        # A plain attribute, not a buffer: model.to(fp16) must not round the frequencies.
        self.inv_freq = inv_freq / g.rope_scaling_factor

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotate-half convention, as in HF Llama."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, g: TextGeometry):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = g.num_heads, g.num_kv_heads, g.head_dim
        self.scale = g.head_dim ** -0.5
        self.q_proj = nn.Linear(g.hidden_size, g.num_heads * g.head_dim, bias=g.attention_bias)
        self.k_proj = nn.Linear(g.hidden_size, g.num_kv_heads * g.head_dim, bias=g.attention_bias)
        self.v_proj = nn.Linear(g.hidden_size, g.num_kv_heads * g.head_dim, bias=g.attention_bias)
        # Qwen2 has q/k/v biases but no output bias.
        self.o_proj = nn.Linear(g.num_heads * g.head_dim, g.hidden_size,
                                bias=g.attention_bias and g.model_type != "qwen2")

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata):
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, g: TextGeometry):
        super().__init__()
        self.gate_proj = nn.Linear(g.hidden_size, g.intermediate_size, bias=g.mlp_bias)
        self.up_proj = nn.Linear(g.hidden_size, g.intermediate_size, bias=g.mlp_bias)
        self.down_proj = nn.Linear(g.intermediate_size, g.hidden_size, bias=g.mlp_bias)
        self.act = ACTIVATIONS[g.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, g: TextGeometry):
        super().__init__()
        self.self_attn = Attention(g)
        self.mlp = MLP(g)
        self.input_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, g: TextGeometry):
        super().__init__()
        if g.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {g.hidden_act!r}")
        self.geometry = g
        self.embed_tokens = nn.Embedding(g.vocab_size, g.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(g) for _ in range(g.num_layers))
        self.norm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.rotary = Rotary(g)
        self.lm_head = nn.Linear(g.hidden_size, g.vocab_size, bias=False)
        if g.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """embeds [T, hidden]; kv_cache [2, layers, blocks, block_size, kv_heads, head_dim] -> hidden [T, hidden]."""
        cos, sin = self.rotary(positions)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache[0, i], kv_cache[1, i], meta)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
