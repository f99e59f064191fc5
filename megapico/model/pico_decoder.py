"""pico-decoder on tensor-parallel layers; TP=1 (tp_group=None) is the degenerate case.

Shape legend: B batch, T sequence, D d_model, H local query heads, K local kv heads, Dh head dim, V vocab.
At TP=1 the module tree and state_dict keys are pico-train's PicoDecoder's, and modules are created in
pico's order, so `torch.manual_seed(42); PicoDecoder(cfg)` gives pico's initial weights. Attention infers
its local head counts from the projection sizes, so one forward serves full and sharded weights.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from megapico.config import ModelConfig, validate_model
from megapico.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_parallel,
    gather_from_tensor_parallel,
    vocab_parallel_cross_entropy,
)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, times a learned scale (replicated)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, Dh/2] of position * theta^(-2i/Dh), built per forward (no cache shared between models)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BTHDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate INTERLEAVED pairs (2i, 2i+1) of each head, in fp32 (pico's complex-number convention)."""
    B, T, H, Dh = x_BTHDh.shape
    pairs = x_BTHDh.float().view(B, T, H, Dh // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.view(1, T, 1, Dh // 2), sin.view(1, T, 1, Dh // 2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(3).type_as(x_BTHDh)


def causal_attention(q_BHTDh: torch.Tensor, k_BKTDh: torch.Tensor, v_BKTDh: torch.Tensor) -> torch.Tensor:
    """Causal SDPA; query head h reads kv head h // (H / K) (GQA). Works for T == 1.

    Only the flash and math kernels take `enable_gqa`, and flash takes only fp16/bf16: an fp32 call with
    enable_gqa would fall back to math and build a [B, H, T, T] fp32 matrix per layer (39 GB at 16 x 2048).
    So fp32 inputs get k/v expanded to the query heads (K/H of the q bytes, no T x T) and the
    memory-efficient kernel; bf16/fp16 keep flash's native GQA.
    """
    H, K = q_BHTDh.shape[1], k_BKTDh.shape[1]
    if H != K and q_BHTDh.dtype not in (torch.float16, torch.bfloat16):
        k_BKTDh, v_BKTDh = (t.repeat_interleave(H // K, dim=1) for t in (k_BKTDh, v_BKTDh))
    return F.scaled_dot_product_attention(q_BHTDh, k_BKTDh, v_BKTDh, is_causal=True,
                                          enable_gqa=H != k_BKTDh.shape[1])


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp_group: ProcessGroup | None) -> None:
        super().__init__()
        d, n_heads, n_kv = config.d_model, config.attention_n_heads, config.attention_n_kv_heads
        self.head_dim = d // n_heads
        self.tp_group = tp_group
        self.checkpoint_core = False  # selective activation checkpointing recomputes only the SDPA
        column = dict(tp_group=tp_group, copy_input=False)
        self.q_proj = ColumnParallelLinear(d, n_heads * self.head_dim, **column)
        self.k_proj = ColumnParallelLinear(d, n_kv * self.head_dim, **column)
        self.v_proj = ColumnParallelLinear(d, n_kv * self.head_dim, **column)
        self.o_proj = RowParallelLinear(n_heads * self.head_dim, d, tp_group=tp_group)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        x_BTD = copy_to_tensor_parallel(x_BTD, self.tp_group)
        q = apply_rope(self.q_proj(x_BTD).view(B, T, -1, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x_BTD).view(B, T, -1, self.head_dim), cos, sin)
        v = self.v_proj(x_BTD).view(B, T, -1, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.checkpoint_core and torch.is_grad_enabled():
            out_BHTDh = checkpoint(causal_attention, q, k, v, use_reentrant=False)
        else:
            out_BHTDh = causal_attention(q, k, v)
        return self.o_proj(out_BHTDh.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """w_2(silu(w_0 x) * w_1 x); hidden units split over TP ranks (w_0/w_1 column, w_2 row)."""

    def __init__(self, config: ModelConfig, tp_group: ProcessGroup | None) -> None:
        super().__init__()
        d, hidden = config.d_model, config.activation_hidden_dim
        self.tp_group = tp_group
        self.w_0 = ColumnParallelLinear(d, hidden, tp_group=tp_group, copy_input=False)
        self.w_1 = ColumnParallelLinear(d, hidden, tp_group=tp_group, copy_input=False)
        self.w_2 = RowParallelLinear(hidden, d, tp_group=tp_group)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = copy_to_tensor_parallel(x_BTD, self.tp_group)
        return self.w_2(F.silu(self.w_0(x_BTD)) * self.w_1(x_BTD))


class PicoDecoderBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + swiglu(norm(h))."""

    def __init__(self, config: ModelConfig, tp_group: ProcessGroup | None) -> None:
        super().__init__()
        self.attention = Attention(config, tp_group)
        self.swiglu = SwiGLU(config, tp_group)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.swiglu_norm = RMSNorm(config.d_model, config.norm_eps)
        self.checkpoint_activations = False  # full activation checkpointing of this block

    def _forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x_BTD + self.attention(self.attention_norm(x_BTD), cos, sin)
        return h + self.swiglu(self.swiglu_norm(h))

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(self._forward, x_BTD, cos, sin, use_reentrant=False)
        return self._forward(x_BTD, cos, sin)


class PicoDecoder(nn.Module):
    """The pico-decoder language model, tensor-parallel over `tp_group` (None = one process)."""

    def __init__(self, config: ModelConfig, tp_group: ProcessGroup | None = None) -> None:
        super().__init__()
        validate_model(config)
        self.config = config
        self.tp_group = tp_group
        self.embedding_proj = VocabParallelEmbedding(config.vocab_size, config.d_model, tp_group)
        self.layers = nn.ModuleList(PicoDecoderBlock(config, tp_group) for _ in range(config.n_layers))
        self.output_norm = RMSNorm(config.d_model, config.norm_eps)
        self.de_embedding_proj = ColumnParallelLinear(config.d_model, config.vocab_size, tp_group=tp_group)
        # Recompute norm -> logits -> loss in backward instead of keeping fp32 [B, T, V/tp] logits and softmax
        # alive through the whole backward: for pico's 50k vocabulary they outweigh all block activations.
        self.checkpoint_loss_head = False

    def hidden_states(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Output of the last block, before output_norm [B, T, D]."""
        T = input_ids_BT.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        h = self.embedding_proj(input_ids_BT)
        cos, sin = rope_tables(T, self.config.d_model // self.config.attention_n_heads,
                               self.config.position_emb_theta, input_ids_BT.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h

    def _local_logits_of(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.de_embedding_proj(self.output_norm(h_BTD)).float()

    def _loss_of(self, h_BTD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        token_loss = vocab_parallel_cross_entropy(self._local_logits_of(h_BTD), labels_BT, self.tp_group)
        return token_loss.sum() / (labels_BT != -100).sum().clamp(min=1)

    def local_logits(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """fp32 logits of this rank's vocab shard [B, T, V/tp]."""
        return self._local_logits_of(self.hidden_states(input_ids_BT))

    def forward(self, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Without labels: full fp32 logits [B, T, V] (gathered over TP). With labels: the mean token
        cross-entropy (ignore_index -100), computed vocab-parallel without gathering the logits."""
        h = self.hidden_states(input_ids_BT)
        if labels_BT is None:
            return gather_from_tensor_parallel(self._local_logits_of(h), self.tp_group)
        if self.checkpoint_loss_head and torch.is_grad_enabled():
            return checkpoint(self._loss_of, h, labels_BT, use_reentrant=False)
        return self._loss_of(h, labels_BT)
