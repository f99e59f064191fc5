"""pico-decoder on tensor-parallel layers; TP=1 (tp_group=None) is the degenerate case.

Shape legend: B batch, T sequence, D d_model, H local query heads, K local kv heads, Dh head dim, V vocab,
N = B * T tokens, S = N / tp a sequence-parallel shard of them.
At TP=1 the module tree and state_dict keys are pico-train's PicoDecoder's, and modules are created in
pico's order, so `torch.manual_seed(42); PicoDecoder(cfg)` gives pico's initial weights. Attention infers
its local head counts from the projection sizes, so one forward serves full and sharded weights.

With sequence parallelism (Megatron's SP, TP > 1) the residual stream between the blocks is a flat [S, D] block of
the batch's tokens on each TP rank: the norms and residual adds run on 1/tp of the tokens, the attention and
SwiGLU inputs are all-gathered to [B, T, D], and their row-parallel outputs reduce-scattered back to [S, D]
instead of all-reduced. The norm weights see only their rank's tokens, so their gradients are summed over TP.
The loss head never builds the logits (megapico.parallel.cross_entropy; under SP it takes the [S, D] shard and
gathers it chunk by chunk); without labels the full fp32 logits are returned as pico does.
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
    column_parallel_linears,
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    gather_from_tensor_parallel,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_token_nll,
)
from megapico.parallel.layers import matmul_dtype


def enter_tensor_parallel(x: torch.Tensor, tp_group: ProcessGroup | None, sequence_parallel: bool,
                          seq_len: int) -> torch.Tensor:
    """The [B, T, D] input of the column-parallel projections: all-gathered tokens under SP, else x itself with
    a backward that sums the gradient over TP."""
    if sequence_parallel:
        return gather_from_sequence_parallel(x, tp_group).view(-1, seq_len, x.shape[-1])
    return copy_to_tensor_parallel(x, tp_group)


class _RMSNormFunction(torch.autograd.Function):
    """pico's RMSNorm, (x * rsqrt(mean(x^2) + eps)).type_as(x) * weight with the statistics in fp32, keeping for
    backward only its input and the per-token rsqrt. Autograd would also keep the normalised tensor (one more
    [tokens, D] tensor per norm, two per block, fp32 even in bf16); backward recomputes it in one elementwise pass,
    as Apex's and Megatron's fused norms do. Gradients are formed in fp32 and cast to the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: ANN001
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        x, weight, rstd = ctx.saved_tensors
        normalized = x.float() * rstd
        grad_out = grad_out.float()
        grad_weight = (grad_out * normalized.type_as(x).float()).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normalized = grad_out * weight.float()
        # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (g - normalized * mean(g * normalized))
        grad_x = rstd * (grad_normalized - normalized * (grad_normalized * normalized).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, times a learned scale (replicated); saves only
    x and the per-token rsqrt for backward (_RMSNormFunction).

    `sequence_parallel_group`: this norm sees only its rank's tokens, so its weight's gradient is summed over TP
    (copy_to_tensor_parallel on the weight) before it reaches DeepSpeed."""

    def __init__(self, dim: int, eps: float, sequence_parallel_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.sequence_parallel_group = sequence_parallel_group
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, copy_to_tensor_parallel(self.weight, self.sequence_parallel_group), self.eps)


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


def sdpa_reads_gqa(device_type: str, dtype: torch.dtype) -> bool:
    """Whether SDPA's kernel reads kv head h // (H / K) for query head h itself (`enable_gqa`): CPU's flash kernel
    in every dtype, CUDA's flash kernel in fp16/bf16. CUDA fp32 takes the memory-efficient kernel, which has no GQA
    (an fp32 call with enable_gqa falls back to math and builds a [B, H, T, T] fp32 matrix per layer: 39 GB at
    16 x 2048), and MPS has none either: there k/v are expanded to the query heads first, and the kernel keeps the
    expanded copies for backward (H/K times the k/v bytes)."""
    return device_type == "cpu" or (device_type == "cuda" and dtype in (torch.float16, torch.bfloat16))


def causal_attention(q_BHTDh: torch.Tensor, k_BKTDh: torch.Tensor, v_BKTDh: torch.Tensor) -> torch.Tensor:
    """Causal SDPA; query head h reads kv head h // (H / K) (GQA). Works for T == 1."""
    H, K = q_BHTDh.shape[1], k_BKTDh.shape[1]
    if H != K and not sdpa_reads_gqa(q_BHTDh.device.type, q_BHTDh.dtype):
        k_BKTDh, v_BKTDh = (t.repeat_interleave(H // K, dim=1) for t in (k_BKTDh, v_BKTDh))
    return F.scaled_dot_product_attention(q_BHTDh, k_BKTDh, v_BKTDh, is_causal=True,
                                          enable_gqa=H != k_BKTDh.shape[1])


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp_group: ProcessGroup | None, sequence_parallel: bool) -> None:
        super().__init__()
        d, n_heads, n_kv = config.d_model, config.attention_n_heads, config.attention_n_kv_heads
        self.head_dim = d // n_heads
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.checkpoint_core = False  # selective activation checkpointing recomputes only the SDPA
        column = dict(tp_group=tp_group, copy_input=False)
        self.q_proj = ColumnParallelLinear(d, n_heads * self.head_dim, **column)
        self.k_proj = ColumnParallelLinear(d, n_kv * self.head_dim, **column)
        self.v_proj = ColumnParallelLinear(d, n_kv * self.head_dim, **column)
        self.o_proj = RowParallelLinear(n_heads * self.head_dim, d, tp_group=tp_group,
                                        sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D], or [S, D] under SP; returns the same shape."""
        T = cos.shape[0]
        q, k, v = column_parallel_linears(x, self.tp_group, self.sequence_parallel, self.q_proj, self.k_proj,
                                          self.v_proj)
        q, k, v = (t.view(-1, T, t.shape[-1] // self.head_dim, self.head_dim) for t in (q, k, v))
        B = q.shape[0]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.checkpoint_core and torch.is_grad_enabled():
            out_BHTDh = checkpoint(causal_attention, q, k, v, use_reentrant=False)
        else:
            out_BHTDh = causal_attention(q, k, v)
        return self.o_proj(out_BHTDh.transpose(1, 2).reshape(B, T, -1))  # [B, T, D], or [S, D] under SP


class _SwiGLUDown(torch.autograd.Function):
    """w_2(silu(gate) * up) on this rank's hidden units, saving only gate and up: silu(gate) and the product (w_2's
    input) are recomputed in backward instead of kept, the two hidden-size activations autograd would keep beside
    them (Megatron's fused SwiGLU recomputes silu the same way). One elementwise pass more in backward, a third
    less of the MLP's saved bytes. The matmuls run in the matmul dtype both ways, as autocast's linear does, with
    autograd's own arithmetic (the silu_backward kernel, the same products)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.dtype = matmul_dtype(gate)
        ctx.save_for_backward(gate, up, weight)
        with torch.autocast(gate.device.type, enabled=False):
            return F.linear((F.silu(gate) * up).to(ctx.dtype), weight.to(ctx.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        gate, up, weight = ctx.saved_tensors
        grad_out = grad_out.to(ctx.dtype)
        silu_gate = F.silu(gate)
        hidden = (silu_gate * up).to(ctx.dtype)
        grad_weight = (grad_out.flatten(0, -2).t() @ hidden.flatten(0, -2)).to(weight.dtype)
        grad_hidden = (grad_out @ weight.to(ctx.dtype)).to(gate.dtype)
        return torch.ops.aten.silu_backward(grad_hidden * up, gate), grad_hidden * silu_gate, grad_weight


def _swiglu_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(gate) * up, weight)


class SwiGLUDownProjection(RowParallelLinear):
    """w_2 applied to silu(gate) * up, keeping only gate and up for backward, then the row-parallel reduction.
    Still a module of its own: pico's learning dynamics read swiglu.w_2's output through a forward hook.

    Eager: _SwiGLUDown. Compiled: AOTAutograd traces _SwiGLUDown's backward into the joint graph, where its
    recomputed product is merged with the forward's and w_2's input is saved after all (a third [tokens, f/tp]
    tensor); a checkpoint region marks silu * up for recomputation instead, and the partitioner recomputes just
    that product (fused into the backward's elementwise kernel), not w_2's matmul, whose output backward does not
    need."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.reduce(checkpoint(_swiglu_down, gate, up, self.weight, use_reentrant=False))
        return self.reduce(_SwiGLUDown.apply(gate, up, self.weight))


class SwiGLU(nn.Module):
    """w_2(silu(w_0 x) * w_1 x); hidden units split over TP ranks (w_0/w_1 column, w_2 row)."""

    def __init__(self, config: ModelConfig, tp_group: ProcessGroup | None, sequence_parallel: bool) -> None:
        super().__init__()
        d, hidden = config.d_model, config.activation_hidden_dim
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.w_0 = ColumnParallelLinear(d, hidden, tp_group=tp_group, copy_input=False)
        self.w_1 = ColumnParallelLinear(d, hidden, tp_group=tp_group, copy_input=False)
        self.w_2 = SwiGLUDownProjection(hidden, d, tp_group=tp_group, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D], or [S, D] under SP; returns the same shape."""
        gate, up = column_parallel_linears(x, self.tp_group, self.sequence_parallel, self.w_0, self.w_1)
        return self.w_2(gate, up)


class PicoDecoderBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + swiglu(norm(h))."""

    def __init__(self, config: ModelConfig, tp_group: ProcessGroup | None, sequence_parallel: bool) -> None:
        super().__init__()
        norm_group = tp_group if sequence_parallel else None
        self.attention = Attention(config, tp_group, sequence_parallel)
        self.swiglu = SwiGLU(config, tp_group, sequence_parallel)
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps, norm_group)
        self.swiglu_norm = RMSNorm(config.d_model, config.norm_eps, norm_group)
        self.checkpoint_activations = False  # full activation checkpointing of this block

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.swiglu(self.swiglu_norm(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)


class PicoDecoder(nn.Module):
    """The pico-decoder language model, tensor-parallel over `tp_group` (None = one process).

    sequence_parallel: Megatron's SP over the TP group (a no-op without one). loss_chunk_tokens: tokens per chunk
    of the fused loss head (one [chunk, V/tp] fp32 logits block alive at a time)."""

    def __init__(self, config: ModelConfig, tp_group: ProcessGroup | None = None, sequence_parallel: bool = False,
                 loss_chunk_tokens: int = 1024) -> None:
        super().__init__()
        validate_model(config)
        self.config = config
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and tp_group is not None
        self.loss_chunk_tokens = loss_chunk_tokens
        self.embedding_proj = VocabParallelEmbedding(config.vocab_size, config.d_model, tp_group,
                                                     sequence_parallel=self.sequence_parallel)
        self.layers = nn.ModuleList(PicoDecoderBlock(config, tp_group, self.sequence_parallel)
                                    for _ in range(config.n_layers))
        self.output_norm = RMSNorm(config.d_model, config.norm_eps, tp_group if self.sequence_parallel else None)
        self.de_embedding_proj = ColumnParallelLinear(config.d_model, config.vocab_size, tp_group=tp_group,
                                                      copy_input=False)
        self.compile_loss_head = False  # torch.compile the loss head's per-chunk elementwise kernels

    def hidden_states(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Output of the last block, before output_norm: [B, T, D], or this rank's [S, D] tokens under SP."""
        T = input_ids_BT.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        h = self.embedding_proj(input_ids_BT)
        cos, sin = rope_tables(T, self.config.d_model // self.config.attention_n_heads,
                               self.config.position_emb_theta, input_ids_BT.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h

    def forward(self, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Without labels: full fp32 logits [B, T, V] (gathered over TP). With labels: the mean token
        cross-entropy (ignore_index -100) from the fused, chunked, vocab-parallel head: no logits tensor; under SP
        the head takes this rank's token shard and gathers it chunk by chunk."""
        B, T = input_ids_BT.shape
        h = self.output_norm(self.hidden_states(input_ids_BT))
        if labels_BT is None:
            x_BTD = enter_tensor_parallel(h, self.tp_group, self.sequence_parallel, T)
            return gather_from_tensor_parallel(self.de_embedding_proj(x_BTD).float(), self.tp_group)
        x_ND = h if self.sequence_parallel else copy_to_tensor_parallel(h, self.tp_group).reshape(B * T, -1)
        return vocab_parallel_linear_cross_entropy(x_ND, self.de_embedding_proj.weight, labels_BT.reshape(B * T),
                                                   self.tp_group, chunk_tokens=self.loss_chunk_tokens,
                                                   compiled=self.compile_loss_head,
                                                   sequence_parallel=self.sequence_parallel)

    @torch.no_grad()
    def token_nll(self, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [B, T] in fp32 (0 where the label is -100), from the chunked vocab-parallel head
        without logits or gradients: what an evaluation needs to score each sequence on its own."""
        B, T = input_ids_BT.shape
        h = self.output_norm(self.hidden_states(input_ids_BT))
        x_ND = enter_tensor_parallel(h, self.tp_group, self.sequence_parallel, T).reshape(B * T, -1)
        return vocab_parallel_token_nll(x_ND, self.de_embedding_proj.weight, labels_BT.reshape(B * T), self.tp_group,
                                        chunk_tokens=self.loss_chunk_tokens).view(B, T)
