"""pico-decoder written plainly from ../shared/spec/pico-decoder.md, independent of megapico's layers.

nn.Linear/nn.Embedding, complex-number interleaved RoPE, an explicit additive causal mask and
repeat_interleave for GQA: the semantics megapico must reproduce at every TP size.
"""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope(x, theta):
    _, seq, _, head_dim = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs_cis = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs))
    x_c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_c * freqs_cis.view(1, seq, 1, -1)).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv = c.attention_n_heads, c.attention_n_kv_heads
        self.hd = c.d_model // c.attention_n_heads
        self.theta = c.position_emb_theta
        self.q_proj = nn.Linear(c.d_model, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(c.d_model, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.d_model, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, c.d_model, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = rope(self.q_proj(x).view(b, t, self.n_heads, self.hd), self.theta).transpose(1, 2)
        k = rope(self.k_proj(x).view(b, t, self.n_kv, self.hd), self.theta).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / self.hd**0.5
        scores = scores + torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        out = torch.softmax(scores.float(), dim=-1).type_as(q) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.w_0 = nn.Linear(c.d_model, c.activation_hidden_dim, bias=False)
        self.w_1 = nn.Linear(c.d_model, c.activation_hidden_dim, bias=False)
        self.w_2 = nn.Linear(c.activation_hidden_dim, c.d_model, bias=False)

    def forward(self, x):
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = Attention(c)
        self.swiglu = SwiGLU(c)
        self.attention_norm = RMSNorm(c.d_model, c.norm_eps)
        self.swiglu_norm = RMSNorm(c.d_model, c.norm_eps)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.swiglu(self.swiglu_norm(h))


class ReferencePicoDecoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embedding_proj = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.output_norm = RMSNorm(c.d_model, c.norm_eps)
        self.de_embedding_proj = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, input_ids):
        h = self.embedding_proj(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.de_embedding_proj(self.output_norm(h)).float()
