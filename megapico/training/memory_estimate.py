"""Per-GPU memory of a run on paper: weights, gradients, the ZeRO-2 optimizer partition, activations.

Bytes per parameter under ZeRO-2 over DP ranks (P = parameters on this TP rank): the module's weights (bf16 2P;
bf16-mixed 4P plus the 2P bf16 copies autocast makes for the matmuls; fp32 4P), the fp32 gradient partition
4P/DP plus two reduce buckets, fp32 master weights + Adam moments 12P/DP. Activations per layer and micro batch
(b sequences of s tokens, hidden h, ffn f, TP t, KV/H the GQA ratio), as saved for backward with flash attention
(no s x s matrix): residual-stream tensors 4sbh (norm inputs/outputs; bf16 in DeepSpeed's bf16, fp32 in
bf16-mixed), matmul inputs (2 + 2KV/H) sbh/t (q, k, v, attention output) + 4sbf/t (SwiGLU) in the matmul dtype,
and the RMSNorms' fp32 statistics 8sbh; the loss adds fp32 logits and softmax 8sbV/t. Full checkpointing keeps
only each block's input plus one block being recomputed.
"""

from dataclasses import dataclass

from megapico.config import ModelConfig
from megapico.training.deepspeed_config import bucket_plan
from megapico.training.metrics import parameters_per_tp_rank

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


def estimate_memory(model: ModelConfig, gpus: int, tp: int, micro_batch: int, seq_len: int,
                    precision: str = "bf16-mixed") -> MemoryEstimate:
    """precision: bf16-mixed (fp32 module + autocast's bf16 weight copies, fp32 residual stream), bf16 (DeepSpeed's
    bf16 module and activations) or fp32. All three keep fp32 gradient partitions, masters and Adam moments."""
    dp = gpus // tp
    params = parameters_per_tp_rank(model, tp)
    bucket, _ = bucket_plan(int(params), dp)
    weight_bytes = {"bf16": 2, "bf16-mixed": 4 + 2, "fp32": 4}[precision]
    residual_bytes, matmul_bytes = {"bf16": (2, 2), "bf16-mixed": (4, 2), "fp32": (4, 4)}[precision]
    s, b, h, f = seq_len, micro_batch, model.d_model, model.activation_hidden_dim
    kv_ratio = model.attention_n_kv_heads / model.attention_n_heads
    matmul_inputs = (2 + 2 * kv_ratio) * s * b * h / tp + 4 * s * b * f / tp
    per_layer = residual_bytes * 4 * s * b * h + matmul_bytes * matmul_inputs + 8 * s * b * h
    logits = 8 * s * b * model.vocab_size / tp
    return MemoryEstimate(
        weights=weight_bytes * params / GIB,
        gradients=(4 * params / dp + 2 * bucket * (2 if precision == "bf16" else 4)) / GIB,
        optimizer=12 * params / dp / GIB,
        activations=(model.n_layers * per_layer + logits) / GIB,
        activations_checkpointed=(model.n_layers * residual_bytes * s * b * h + per_layer + logits) / GIB,
    )
