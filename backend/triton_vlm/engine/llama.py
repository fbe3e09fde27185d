"""A Llama-family decoder (Llama, Mistral, Qwen2) that reads and writes a paged KV cache.

Tokens of every sequence in a step are flattened into one [T, hidden] batch; only attention
needs to know where one sequence ends and the next begins: the attention backend (attention.py on
CPU, attention_cuda.py on CUDA) and the metadata it prepared for the step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import TextGeometry

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, bit-identical to HF's formula below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
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
        # M-RoPE: frequency j turns with position row section_row[j] (sections in order, rows cycling 0, 1, 2).
        sections = g.mrope_section
        self.section_row = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(sections)]) if sections else None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, head_dim], once per step; sin carries rotate-half's sign (see apply_rotary).

        positions: [T], or [3, T] under M-RoPE."""
        if positions.dim() == 2:
            rows = self.section_row.to(positions.device)
            freqs = positions[rows].T.float() * self.inv_freq.to(positions.device)[None, :]
        else:
            freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = freqs.shape[-1]
        sin = emb.sin()
        sin[:, :half].neg_()
        return emb.cos()[:, None, :].to(dtype), sin[:, None, :].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotate-half convention, as in HF Llama (x * cos + rotate_half(x) * sin)."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), signed_sin)


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

    def fuse(self) -> None:
        """One matmul for q, k and v (after the weights are loaded): fewer, larger GEMVs per step."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, k_cache, v_cache, backend, meta):
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.heads + 2 * self.kv_heads, self.head_dim)
        # q and k rotate together: one rotary pass over heads + kv_heads rows.
        qk = apply_rotary(qkv[:, :self.heads + self.kv_heads], cos, sin)
        q, k = qk[:, :self.heads], qk[:, self.heads:]
        v = qkv[:, self.heads + self.kv_heads:]
        o = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, g: TextGeometry):
        super().__init__()
        self.gate_proj = nn.Linear(g.hidden_size, g.intermediate_size, bias=g.mlp_bias)
        self.up_proj = nn.Linear(g.hidden_size, g.intermediate_size, bias=g.mlp_bias)
        self.down_proj = nn.Linear(g.intermediate_size, g.hidden_size, bias=g.mlp_bias)
        self.act = ACTIVATIONS[g.hidden_act]

    def fuse(self) -> None:
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate).mul_(up))


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    first = linears[0]
    bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if bias:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


class PackedLinear(nn.Module):
    """An nn.Linear whose weight MKL packs once for GEMMs with few rows (CPU, fp32).

    A decode step multiplies the same weights by a handful of rows; MKL's packed SGEMM skips re-packing
    them every call (measured over the 58m preset's weights, cold: 1.4x at 16 rows, 1.1x at 1 row). From
    PACKED_MAX_ROWS up the plain SGEMM is as fast, and at prefill sizes faster (1.2-1.5x at 1760 rows).
    """

    PACKED_MAX_ROWS = 32

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.PACKED_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, x.shape[0])


class DecoderLayer(nn.Module):
    def __init__(self, g: TextGeometry):
        super().__init__()
        self.self_attn = Attention(g)
        self.mlp = MLP(g)
        self.input_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, backend, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, backend, meta)
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

    def fuse(self) -> None:
        """Fuse q/k/v and gate/up projections; forward needs it: call once, after the weights are loaded."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def pack(self) -> None:
        """CPU fp32 with MKL: every projection and lm_head become PackedLinear (after fuse)."""
        if self.lm_head.weight.device.type != "cpu" or self.lm_head.weight.dtype != torch.float32:
            return
        if not mkl_packing_available():
            return
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv_proj, a.o_proj = PackedLinear(a.qkv_proj), PackedLinear(a.o_proj)
            m.gate_up_proj, m.down_proj = PackedLinear(m.gate_up_proj), PackedLinear(m.down_proj)
        self.lm_head = PackedLinear(self.lm_head)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, backend,
                meta) -> torch.Tensor:
        """embeds [T, hidden]; kv_cache [2, layers, ...] in the backend's layout -> hidden [T, hidden].

        backend: an attention backend (attention.py, attention_cuda.py); meta: what it prepared for this step.
        """
        cos, sin = self.rotary(positions, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache[0, i], kv_cache[1, i], backend, meta)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
