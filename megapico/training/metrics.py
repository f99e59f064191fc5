"""Throughput arithmetic (FLOPs, MFU) and memory readings for the log line.

Training FLOPs per token = 6 * N + 12 * n_layers * d_model * seq_len, where N counts the parameters that
take part in matrix multiplies: all of them except the input embedding table (a lookup); the untied output
projection counts. The second term is attention's QK^T and AV (forward + backward), not discounted for
causality, as in Megatron-LM and PaLM's MFU. Activation recomputation is not counted (MFU, not HFU).
"""

import resource

import torch

from megapico.config import ModelConfig

PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "A10": 125.0, "L4": 121.0}


def matmul_parameters(model: ModelConfig) -> int:
    d, hidden, kv_dim = model.d_model, model.activation_hidden_dim, model.d_model // model.attention_n_heads * \
        model.attention_n_kv_heads
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * hidden
    return model.n_layers * per_layer + model.vocab_size * d


def parameters_per_tp_rank(model: ModelConfig, tp: int) -> float:
    """All parameters one TP rank holds (norms replicated, everything else split by TP)."""
    hd = model.d_model // model.attention_n_heads
    per_layer = (2 * model.d_model * model.d_model + 2 * model.d_model * hd * model.attention_n_kv_heads
                 + 3 * model.d_model * model.activation_hidden_dim) / tp + 2 * model.d_model
    return model.n_layers * per_layer + 2 * model.vocab_size * model.d_model / tp + model.d_model


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    return 6.0 * matmul_parameters(model) + 12.0 * model.n_layers * model.d_model * seq_len


def peak_tflops_per_device() -> float | None:
    """bf16 dense peak of the local GPU, or None where unknown (CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def peak_memory_gib() -> float:
    """Peak CUDA allocation on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
