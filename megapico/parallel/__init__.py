"""Tensor parallelism: process groups (and DeepSpeed's mpu), autograd mappings, layers, vocab-parallel loss."""

from megapico.parallel.cross_entropy import vocab_parallel_linear_cross_entropy, vocab_parallel_token_nll
from megapico.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linears,
)
from megapico.parallel.mappings import (
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
    scatter_to_tensor_parallel,
)
from megapico.parallel.state import (
    LaunchError,
    ParallelState,
    agree_across_ranks,
    default_backend,
    free_port,
    init_distributed,
)

__all__ = [
    "ColumnParallelLinear", "LaunchError", "ParallelState", "RowParallelLinear", "VocabParallelEmbedding",
    "agree_across_ranks", "copy_to_tensor_parallel", "default_backend", "free_port", "gather_from_sequence_parallel",
    "gather_from_tensor_parallel", "init_distributed", "reduce_from_tensor_parallel",
    "reduce_scatter_to_sequence_parallel", "scatter_to_tensor_parallel", "column_parallel_linears",
    "vocab_parallel_linear_cross_entropy", "vocab_parallel_token_nll",
]
