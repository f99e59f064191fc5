"""pico-decoder for Hugging Face transformers: PicoDecoderHFConfig + PicoDecoderHF (self-contained).

Written by megapico's tools/convert_to_hf.py next to config.json and model.safetensors; loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` on transformers 4.x and 5.x. Weight keys
and numbers are pico-train's (`pico_decoder.` + PicoDecoder keys). Unlike pico-train's file it has no
class-level RoPE cache (tables are built per forward, so meta-device construction works), calls
post_init(), and accepts sequences of length 1. Semantics: pre-norm blocks, fp32 RMSNorm, interleaved RoPE,
GQA, SwiGLU, no biases, untied embeddings, fp32 logits.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class PicoDecoderHFConfig(PretrainedConfig):
    model_type = "pico_decoder"

    def __init__(self, d_model: int = 96, n_layers: int = 12, attention_n_heads: int = 12,
                 attention_n_kv_heads: int = 4, activation_hidden_dim: int = 384, vocab_size: int = 50304,
                 max_seq_len: int = 2048, norm_eps: float = 1e-6, position_emb_theta: float = 10000.0,
                 batch_size: int = 1024, **kwargs: Any) -> None:
        self.d_model, self.n_layers = d_model, n_layers
        self.attention_n_heads, self.attention_n_kv_heads = attention_n_heads, attention_n_kv_heads
        self.activation_hidden_dim, self.vocab_size, self.max_seq_len = activation_hidden_dim, vocab_size, max_seq_len
        self.norm_eps, self.position_emb_theta, self.batch_size = norm_eps, position_emb_theta, batch_size
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def apply_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Interleaved pairs (2i, 2i+1) of each head rotated by position * theta^(-2i/head_dim), in fp32."""
    batch, seq, heads, head_dim = x.shape
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=x.device).float() / head_dim))
    angles = torch.outer(torch.arange(seq, device=x.device).float(), inv_freq).view(1, seq, 1, head_dim // 2)
    pairs = x.float().view(batch, seq, heads, head_dim // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: PicoDecoderHFConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.attention_n_heads, config.attention_n_kv_heads
        self.head_dim, self.theta = config.d_model // config.attention_n_heads, config.position_emb_theta
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = apply_rope(self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim), self.theta).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim), self.theta).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: PicoDecoderHFConfig) -> None:
        super().__init__()
        self.w_0 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)
        self.w_1 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)
        self.w_2 = nn.Linear(config.activation_hidden_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


class PicoDecoderBlock(nn.Module):
    def __init__(self, config: PicoDecoderHFConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.swiglu = SwiGLU(config)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.swiglu_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.swiglu(self.swiglu_norm(h))


class PicoDecoder(nn.Module):
    def __init__(self, config: PicoDecoderHFConfig) -> None:
        super().__init__()
        self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(PicoDecoderBlock(config) for _ in range(config.n_layers))
        self.output_norm = RMSNorm(config.d_model, config.norm_eps)
        self.de_embedding_proj = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding_proj(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.de_embedding_proj(self.output_norm(h)).float()


class PicoDecoderHF(PreTrainedModel):
    config_class = PicoDecoderHFConfig
    base_model_prefix = "pico_decoder"
    _no_split_modules = ["PicoDecoderBlock"]

    def __init__(self, config: PicoDecoderHFConfig) -> None:
        super().__init__(config)
        self.pico_decoder = PicoDecoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Weights always come from the checkpoint; fresh models use torch's default initialisation."""

    def get_input_embeddings(self) -> nn.Module:
        return self.pico_decoder.embedding_proj

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        logits = self.pico_decoder(input_ids)
        loss = None
        if labels is not None:  # HF convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


PicoDecoderHFConfig.register_for_auto_class()
PicoDecoderHF.register_for_auto_class("AutoModel")
PicoDecoderHF.register_for_auto_class("AutoModelForCausalLM")
