"""pico-decoder for Hugging Face transformers: PicoDecoderHFConfig + PicoDecoderHF (self-contained).

Written by megapico's tools/convert_to_hf.py next to config.json and model.safetensors; loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` on transformers 4.x and 5.x. Weight keys
and numbers are pico-train's (`pico_decoder.` + PicoDecoder keys). Unlike pico-train's file it has no
class-level RoPE cache (tables are built per forward, so meta-device construction works), calls
post_init(), and accepts sequences of length 1. Semantics: pre-norm blocks, fp32 RMSNorm, interleaved RoPE,
GQA, SwiGLU, no biases, untied embeddings, fp32 logits.

`generate()` works: the generation mixin, a KV cache (transformers' DynamicCache, passed as `cache` on 5.x and
`past_key_values` on 4.x), attention masks of left-padded batches, and RoPE at each token's absolute position
(from `position_ids`, else from the attention mask, else from the cache length). A plain forward (no cache, no
padding) runs exactly the computation it always did.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5 renamed the cache argument and output field `past_key_values` -> `cache`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class PicoDecoderHFConfig(PretrainedConfig):
    model_type = "pico_decoder"
    # transformers' generic names for pico's fields (its cache and generation code read these)
    attribute_map = {"num_hidden_layers": "n_layers", "hidden_size": "d_model",
                     "num_attention_heads": "attention_n_heads", "num_key_value_heads": "attention_n_kv_heads",
                     "intermediate_size": "activation_hidden_dim", "max_position_embeddings": "max_seq_len",
                     "rms_norm_eps": "norm_eps"}

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


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, 1, head_dim/2] of position * theta^(-2i/head_dim) for positions [B, T] (or [T])."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq
    angles = angles.view(-1, angles.shape[-2], 1, head_dim // 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (2i, 2i+1) of each head rotated by the tables' angles, in fp32."""
    batch, seq, heads, head_dim = x.shape
    pairs = x.float().view(batch, seq, heads, head_dim // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: "PicoDecoderHFConfig", layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.attention_n_heads, config.attention_n_kv_heads
        self.head_dim, self.layer_idx = config.d_model // config.attention_n_heads, layer_idx
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: DynamicCache | None) -> torch.Tensor:
        """mask: None (causal over x alone, or one query against the whole cache) or a bool [B, 1, T, past + T]."""
        batch, seq, _ = x.shape
        q = apply_rope(self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:  # keys/values of earlier tokens, kept per kv head (before the GQA repeat)
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
    def __init__(self, config: "PicoDecoderHFConfig", layer_idx: int) -> None:
        super().__init__()
        self.attention = Attention(config, layer_idx)
        self.swiglu = SwiGLU(config)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.swiglu_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: DynamicCache | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.swiglu(self.swiglu_norm(h))


def attention_mask_for(attention_mask: torch.Tensor | None, past: int, seq: int) -> torch.Tensor | None:
    """None when plain causal attention is exact (no padding, and no cache or a single new token); else a bool
    [B, 1, seq, past + seq] mask: causal over absolute slots, padded keys excluded. Each query may always see its
    own slot, so rows of padding (whose outputs are never used) stay finite."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or seq == 1):
        return None
    device = attention_mask.device if attention_mask is not None else None
    keys = torch.arange(past + seq, device=device)
    queries = torch.arange(past, past + seq, device=device).unsqueeze(-1)
    mask = (keys <= queries).unsqueeze(0)
    if padded:
        mask = mask & attention_mask[:, -(past + seq):].bool().unsqueeze(1)
    return (mask | (keys == queries)).unsqueeze(1)


class PicoDecoder(nn.Module):
    def __init__(self, config: "PicoDecoderHFConfig") -> None:
        super().__init__()
        self.config = config
        self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(PicoDecoderBlock(config, index) for index in range(config.n_layers))
        self.output_norm = RMSNorm(config.d_model, config.norm_eps)
        self.de_embedding_proj = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: DynamicCache | None = None) -> torch.Tensor:
        """fp32 logits [B, T, V]. attention_mask [B, past + T] (1 = token, 0 = padding) covers the cached tokens
        too; positions default to the mask's running count (left padding) or to past + arange(T)."""
        batch, seq = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq, device=input_ids.device)
        config = self.config
        cos, sin = rope_tables(position_ids, config.d_model // config.attention_n_heads, config.position_emb_theta)
        mask = attention_mask_for(attention_mask, past, seq)
        h = self.embedding_proj(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.de_embedding_proj(self.output_norm(h)).float()


class PicoDecoderHF(PreTrainedModel, GenerationMixin):
    config_class = PicoDecoderHFConfig
    base_model_prefix = "pico_decoder"
    _no_split_modules = ["PicoDecoderBlock"]
    _supports_cache_class = True  # transformers 4.x: hand forward a DynamicCache, not legacy tuples

    def __init__(self, config: PicoDecoderHFConfig) -> None:
        super().__init__(config)
        self.pico_decoder = PicoDecoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Weights always come from the checkpoint; fresh models use torch's default initialisation."""

    def get_input_embeddings(self) -> nn.Module:
        return self.pico_decoder.embedding_proj

    def get_output_embeddings(self) -> nn.Module:
        return self.pico_decoder.de_embedding_proj

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: DynamicCache | None = None,
                cache: DynamicCache | None = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        use_cache = cache is not None if use_cache is None else use_cache
        cache = (cache if cache is not None else DynamicCache()) if use_cache else None
        logits = self.pico_decoder(input_ids, attention_mask, position_ids, cache)
        loss = None
        if labels is not None:  # HF convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


PicoDecoderHFConfig.register_for_auto_class()
PicoDecoderHF.register_for_auto_class("AutoModel")
PicoDecoderHF.register_for_auto_class("AutoModelForCausalLM")
