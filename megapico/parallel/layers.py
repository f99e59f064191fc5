"""Tensor-parallel layers: thin modules that only compose the mappings in mappings.py.

Every layer draws its FULL weight from the global (seeded) RNG and keeps this rank's slice, so the
same seed gives the same full model at every TP size, and the RNG is consumed exactly as torch's own
nn.Linear / nn.Embedding would consume it (pico-train's initialisation is reproduced bit for bit).
Sharded parameters carry `tensor_model_parallel=True` and `partition_dim`, which DeepSpeed reads to
count them once in the gradient norm, and which checkpoint gather/shard code can rely on.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megapico.parallel.mappings import (
    all_gather_dim0,
    copy_to_tensor_parallel,
    gather_from_tensor_parallel,
    group_rank,
    group_size,
    reduce_from_tensor_parallel,
    reduce_scatter_dim0,
    reduce_scatter_to_sequence_parallel,
)


def kaiming_uniform_init(weight: torch.Tensor) -> None:
    """torch's nn.Linear default (a=sqrt(5)), on the full [out, in] tensor so fan_in is the full one."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def _shard_of_full(shape: tuple[int, int], partition_dim: int, init: Callable[[torch.Tensor], None],
                   group: ProcessGroup | None) -> nn.Parameter:
    full = torch.empty(shape)
    init(full)
    shard = full.chunk(group_size(group), dim=partition_dim)[group_rank(group)].clone()
    param = nn.Parameter(shard)
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    return param


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: autocast's when it is on (bf16-mixed), else x's own. Custom autograd
    functions need it: their backward runs outside the forward's autocast region."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _gather_and_project(x_SD: torch.Tensor, group: ProcessGroup, weights: tuple[torch.Tensor, ...],
                        dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """All-gather this rank's [S, D] tokens (cast to the matmul dtype first) and apply each weight: [N, out/tp]."""
    with torch.autocast(x_SD.device.type, enabled=False):
        x_ND = all_gather_dim0(x_SD.to(dtype), group)
        return tuple(F.linear(x_ND, weight.to(dtype)) for weight in weights)


class _SequenceParallelLinears(torch.autograd.Function):
    """All-gather this rank's [S, D] tokens once and apply several column-parallel weights to the [N, D] result,
    keeping only the [S, D] shard for backward, where the tokens are gathered again (Megatron's SP linear): the
    gathered input, the largest tensor the projections would save, is never held. The shard is cast to the matmul
    dtype before it is gathered and saved (bf16 under bf16-mixed: half the all-gather bytes both ways and half the
    saved bytes of the fp32 residual stream's norm output; the same numbers, the cast commutes with the gather).
    The matmuls run in the matmul dtype in both directions, as autocast's linear does, the gradients cast back to
    the input's and weights' dtypes."""

    @staticmethod
    def forward(ctx, x_SD: torch.Tensor, group: ProcessGroup, *weights: torch.Tensor):  # noqa: ANN001, ANN205
        dtype = matmul_dtype(x_SD)
        ctx.group, ctx.input_dtype = group, x_SD.dtype
        x_SD = x_SD.to(dtype)
        ctx.save_for_backward(x_SD, *weights)
        return _gather_and_project(x_SD, group, weights, dtype)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # noqa: ANN001, ANN205
        x_SD, *weights = ctx.saved_tensors
        x_ND = all_gather_dim0(x_SD, ctx.group)
        grads = [grad.flatten(0, -2).to(x_ND.dtype) for grad in grads]
        # each product in the matmul dtype, summed in the input's (autograd's sum of autocast linears' gradients)
        grad_x = sum((grad @ weight.to(x_ND.dtype)).to(ctx.input_dtype)
                     for grad, weight in zip(grads, weights, strict=True))
        grad_weights = tuple((grad.t() @ x_ND).to(weight.dtype) for grad, weight in zip(grads, weights, strict=True))
        return (reduce_scatter_dim0(grad_x, ctx.group), None, *grad_weights)


class _SharedMatmulInput(torch.autograd.Function):
    """One use of `low`, x already cast to the matmul dtype, standing for x: its gradient is cast back to x's dtype
    on its own. Each projection gets one, so they all save the same copy (autocast would cast x once per linear
    and keep each cast), and their gradients are still summed in x's dtype, as autocast's would be."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.dtype = x.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad.to(ctx.dtype), None


def column_parallel_linears(x: torch.Tensor, group: ProcessGroup | None, sequence_parallel: bool,
                            *layers: "ColumnParallelLinear") -> tuple[torch.Tensor, ...]:
    """Several column-parallel layers fed by one input (q/k/v, w_0/w_1). Under SP, x is this rank's [S, D] tokens:
    one all-gather serves every layer and only the shard is saved (above), outputs [N, out/tp]. Otherwise x enters
    the TP region once (one gradient all-reduce in backward for all of them) and each layer runs on it, on one
    copy of it in the matmul dtype (bf16 under bf16-mixed)."""
    if sequence_parallel:
        weights = tuple(layer.weight for layer in layers)
        if not torch.is_grad_enabled():
            # nothing to keep for backward (eval, generation); and torch.compile (2.13) traces the autograd
            # function under no_grad with its arguments shifted by one (the group lands in ctx): *weights varargs
            return _gather_and_project(x, group, weights, matmul_dtype(x))
        return _SequenceParallelLinears.apply(x, group, *weights)
    x = copy_to_tensor_parallel(x, group)
    dtype = matmul_dtype(x)
    if dtype == x.dtype:
        return tuple(layer(x) for layer in layers)
    low = x.detach().to(dtype)
    return tuple(layer(_SharedMatmulInput.apply(x, low)) for layer in layers)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows: each rank computes out_features / tp of the outputs.

    copy_input=False lets a caller that feeds several column layers from one input (q/k/v, w_0/w_1) copy
    it into the TP region once, so backward does one all-reduce instead of one per projection.
    """

    def __init__(self, in_features: int, out_features: int, tp_group: ProcessGroup | None = None,
                 gather_output: bool = False, copy_input: bool = True,
                 init: Callable[[torch.Tensor], None] = kaiming_uniform_init) -> None:
        super().__init__()
        divide(out_features, group_size(tp_group), "out_features")
        self.tp_group, self.gather_output, self.copy_input = tp_group, gather_output, copy_input
        self.weight = _shard_of_full((out_features, in_features), 0, init, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tensor_parallel(x, self.tp_group)
        y = F.linear(x, self.weight)
        return gather_from_tensor_parallel(y, self.tp_group) if self.gather_output else y


def exit_tensor_parallel(partial: torch.Tensor, tp_group: ProcessGroup | None, sequence_parallel: bool) -> torch.Tensor:
    """Complete partial sums over TP: all-reduce to the same shape, or (SP) reduce-scatter the flattened tokens
    to this rank's [S, D] block."""
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel(partial.flatten(0, -2), tp_group)
    return reduce_from_tensor_parallel(partial, tp_group)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns: the input arrives already split (from a column layer),
    each rank forms a partial sum, and one all-reduce (or, under SP, reduce-scatter) completes it."""

    def __init__(self, in_features: int, out_features: int, tp_group: ProcessGroup | None = None,
                 sequence_parallel: bool = False, init: Callable[[torch.Tensor], None] = kaiming_uniform_init) -> None:
        super().__init__()
        divide(in_features, group_size(tp_group), "in_features")
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = _shard_of_full((out_features, in_features), 1, init, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(F.linear(x, self.weight))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's partial product -> the full output (all-reduce; under SP, reduce-scatter to the tokens)."""
        return exit_tensor_parallel(partial, self.tp_group, self.sequence_parallel)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over TP ranks; each rank looks up the ids it owns,
    writes zeros for the rest, and an all-reduce assembles the full embeddings (under SP a reduce-scatter
    leaves each rank its [S, D] block of the tokens)."""

    def __init__(self, vocab_size: int, dim: int, tp_group: ProcessGroup | None = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.vocab_per_rank = divide(vocab_size, group_size(tp_group), "vocab_size")
        self.vocab_start = group_rank(tp_group) * self.vocab_per_rank
        self.weight = _shard_of_full((vocab_size, dim), 0, nn.init.normal_, tp_group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        foreign = (local_ids < 0) | (local_ids >= self.vocab_per_rank)
        embedded = F.embedding(local_ids.masked_fill(foreign, 0), self.weight)
        embedded = embedded.masked_fill(foreign.unsqueeze(-1), 0.0)
        return exit_tensor_parallel(embedded, self.tp_group, self.sequence_parallel)
