"""Per-GPU memory of a run on paper: weights, gradients, the ZeRO-2 optimizer partition, activations.

Bytes per parameter under ZeRO-2 over DP ranks (P = parameters on this TP rank): the module's weights (bf16 2P;
bf16-mixed 4P plus the 2P bf16 copies autocast makes for the matmuls; fp32 4P), the fp32 gradient partition
4P/DP plus two reduce buckets, fp32 master weights + Adam moments 12P/DP.

Activations: the tensors autograd saves for backward in megapico's model (checked against saved_tensors_hooks in
tests/test_memory_estimate.py). Per layer and micro batch of b sequences of s tokens (hidden h, ffn f, TP t, GQA
ratio r = KV/H, m the matmul bytes: 4 in fp32, 2 in bf16 and bf16-mixed):
- each RMSNorm keeps only its input, the residual stream (r_b bytes: fp32 4, bf16-mixed 4, bf16 2), and an fp32
  rsqrt per token, two norms: 2 (r_b h + 4) sb;
- the q/k/v and w_0/w_1 inputs (the norm outputs; bf16 copies under autocast): 2 m sbh;
- attention with flash/memory-efficient kernels (no s x s matrix): q, k, v and the output, (2 + 2r) m sbh/t where
  the kernel reads GQA itself (CUDA bf16, CPU), 4 m sbh/t where k/v are expanded to the query heads first (CUDA
  fp32), plus o_proj's input m sbh/t;
- SwiGLU: gate and up only (silu and w_2's input recomputed in backward), 2 m sbf/t.
Sequence parallelism divides the norm and projection-input terms by t too. The fused loss head keeps one
[sb, h] hidden-state gradient (/t under SP, where it takes the token shard) and an fp32 [V/t, h] weight gradient
(no logits); the output norm adds (r_b h + 4) sb (/t).
Full activation checkpointing keeps each block's input (the residual stream, r_b bytes, /t under SP) plus one
block being recomputed.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from megapico.config import MegapicoConfig, ModelConfig
from megapico.model.pico_decoder import sdpa_reads_gqa
from megapico.training.deepspeed_config import bucket_plan, resolve_precision
from megapico.training.metrics import parameters_per_tp_rank

GIB = 2**30
MATMUL_BYTES = {"fp32": 4, "bf16-mixed": 2, "bf16": 2}
RESIDUAL_BYTES = {"fp32": 4, "bf16-mixed": 4, "bf16": 2}


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


def activation_bytes(model: ModelConfig, micro_batch: int, seq_len: int, tp: int = 1, precision: str = "bf16-mixed",
                     sequence_parallel: bool = False, checkpointed: bool = False, device: str = "cuda") -> float:
    """Bytes saved for backward by one forward of `micro_batch` sequences on one TP rank (formula above), on
    `device` ("cuda" or "cpu"): which SDPA kernel runs, and so whether k/v are kept expanded, depends on it."""
    tokens, h, f = micro_batch * seq_len, model.d_model, model.activation_hidden_dim
    residual, matmul = RESIDUAL_BYTES[precision], MATMUL_BYTES[precision]
    norm = residual * h + 4  # per token: the norm's input and its fp32 rsqrt
    kv_ratio = model.attention_n_kv_heads / model.attention_n_heads
    sp = tp if sequence_parallel else 1
    matmul_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    attention_units = 2 + 2 * kv_ratio if sdpa_reads_gqa(device, matmul_dtype) else 4
    per_layer = tokens * (2 * norm / sp + 2 * matmul * h / sp + attention_units * matmul * h / tp
                          + matmul * h / tp + 2 * matmul * f / tp)
    head = tokens * (residual * h + norm) / sp + 4 * model.vocab_size * h / tp
    if checkpointed:
        return model.n_layers * tokens * h * residual / sp + per_layer + head
    return model.n_layers * per_layer + head


def estimate_memory(model: ModelConfig, gpus: int, tp: int, micro_batch: int, seq_len: int,
                    precision: str = "bf16-mixed", sequence_parallel: bool = False,
                    loss_chunk_tokens: int = 1024) -> MemoryEstimate:
    """precision: bf16-mixed (fp32 module + autocast's bf16 weight copies, fp32 residual stream), bf16 or
    lightning-deepspeed-bf16 (DeepSpeed's bf16 module and activations) or fp32. All keep fp32 gradient
    partitions, masters and Adam moments.
    Activations include the loss head's working set while it runs: one chunk's logits, fp32 softmax and
    gradient ([chunk, V/t] each)."""
    if precision == "lightning-deepspeed-bf16":  # the same bf16 engine; its bf16 gradients are counted as bf16's
        precision = "bf16"
    dp = gpus // tp
    params = parameters_per_tp_rank(model, tp)
    bucket, _ = bucket_plan(int(params), dp)
    weight_bytes = {"bf16": 2, "bf16-mixed": 4 + 2, "fp32": 4}[precision]
    head_working_set = 3 * 4 * min(loss_chunk_tokens, micro_batch * seq_len) * model.vocab_size / tp
    activations = {checkpointed: (activation_bytes(model, micro_batch, seq_len, tp, precision, sequence_parallel,
                                                   checkpointed) + head_working_set) / GIB
                   for checkpointed in (False, True)}
    return MemoryEstimate(
        weights=weight_bytes * params / GIB,
        gradients=(4 * params / dp + 2 * bucket * (2 if precision == "bf16" else 4)) / GIB,
        optimizer=12 * params / dp / GIB,
        activations=activations[False],
        activations_checkpointed=activations[True],
    )


def estimate_run(config: MegapicoConfig, gpus: int) -> MemoryEstimate:
    """estimate_memory for a run config on `gpus` CUDA devices: its TP size, sequence parallelism, micro batch,
    sequence length, loss chunk and the precision it resolves to on CUDA."""
    train = config.training
    return estimate_memory(config.model, gpus, config.parallel.tensor_parallel_size, train.micro_batch_size,
                           config.data.seq_len, resolve_precision(config, cuda=True),
                           config.parallel.sequence_parallel, train.loss_chunk_tokens)


def largest_micro_batch(model: ModelConfig, gpus: int, tp: int, seq_len: int, precision: str = "bf16-mixed",
                        sequence_parallel: bool = False, budget_gib: float = 72.0, checkpointed: bool = False) -> int:
    """The largest micro batch whose estimate stays under `budget_gib` (an 80 GB A100 less room for the CUDA
    context, NCCL buffers and the allocator's fragmentation)."""
    micro = 0
    while True:
        estimate = estimate_memory(model, gpus, tp, micro + 1, seq_len, precision, sequence_parallel)
        if (estimate.total_checkpointed if checkpointed else estimate.total) > budget_gib:
            return micro
        micro += 1


def saved_for_backward(loss_fn: Callable[[], torch.Tensor], weights: Iterable[torch.Tensor]) -> tuple[int, int]:
    """What the activation term estimates, measured: (total, largest) bytes of the storages autograd saves for
    backward while loss_fn() runs, each storage once. Weights are not activations: their own storages are left out,
    and so are autocast's low-precision copies of them (a saved tensor of a weight's shape in another dtype; the
    estimate counts those copies with the weights). Runs the backward too, which frees them."""
    weights = list(weights)
    skip = {weight.untyped_storage().data_ptr() for weight in weights}
    weight_dtypes: dict[tuple[int, ...], set[torch.dtype]] = {}
    for weight in weights:
        weight_dtypes.setdefault(tuple(weight.shape), set()).add(weight.dtype)
    sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        weight_copy = tensor.dtype not in weight_dtypes.get(tuple(tensor.shape), {tensor.dtype})
        if storage.data_ptr() not in skip and not weight_copy:
            skip.add(storage.data_ptr())
            sizes.append(storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    loss.backward()
    return sum(sizes), max(sizes, default=0)
