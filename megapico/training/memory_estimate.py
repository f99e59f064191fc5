"""Per-GPU memory of a run on paper: weights, gradients, the ZeRO-2 optimizer partition, activations.

Bytes per parameter with bf16 mixed precision under ZeRO-2 over DP ranks (P = parameters on this TP rank):
bf16 weights 2P (replicated over DP), bf16 gradients 2P/DP (partitioned; plus reduce buckets), fp32 master
weights + Adam moments + fp32 gradient partition 16P/DP. Activations per layer and micro batch (b sequences
of s tokens, hidden h, ffn f, TP t, KV/H the GQA ratio), as saved for backward with flash attention (no
s x s matrix): 2-byte tensors 4sbh (norm inputs/outputs) + (2 + 2KV/H) sbh/t (q, k, v, attention output) +
4sbf/t (SwiGLU), and the RMSNorms' fp32 copies 8sbh; the loss adds fp32 logits and softmax 8sbV/t. Full
checkpointing keeps only each block's input (2sbh) plus one block being recomputed.
"""

from dataclasses import dataclass

from megapico.config import ModelConfig

GIB = 2**30


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_checkpointed: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total_checkpointed(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations_checkpointed


def parameters_per_tp_rank(model: ModelConfig, tp: int) -> float:
    hd = model.d_model // model.attention_n_heads
    per_layer = (2 * model.d_model * model.d_model + 2 * model.d_model * hd * model.attention_n_kv_heads
                 + 3 * model.d_model * model.activation_hidden_dim) / tp + 2 * model.d_model
    return model.n_layers * per_layer + 2 * model.vocab_size * model.d_model / tp + model.d_model


def estimate_memory(model: ModelConfig, gpus: int, tp: int, micro_batch: int, seq_len: int,
                    bucket_bytes: float = 2 * 200e6) -> MemoryEstimate:
    dp = gpus // tp
    params = parameters_per_tp_rank(model, tp)
    s, b, h, f = seq_len, micro_batch, model.d_model, model.activation_hidden_dim
    kv_ratio = model.attention_n_kv_heads / model.attention_n_heads
    per_layer = 2 * (4 * s * b * h + (2 + 2 * kv_ratio) * s * b * h / tp + 4 * s * b * f / tp) + 8 * s * b * h
    logits = 8 * s * b * model.vocab_size / tp
    return MemoryEstimate(
        weights=2 * params / GIB,
        gradients=(2 * params / dp + bucket_bytes) / GIB,
        optimizer=16 * params / dp / GIB,
        activations=(model.n_layers * per_layer + logits) / GIB,
        activations_checkpointed=(model.n_layers * 2 * s * b * h + per_layer + logits) / GIB,
    )
