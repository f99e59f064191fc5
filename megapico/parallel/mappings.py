"""The four autograd pairs that move activations across the tensor-parallel group (Megatron's mappings).

| function      | forward                    | backward                   |
|---------------|----------------------------|----------------------------|
| copy_to       | identity                   | all-reduce the gradient    |
| reduce_from   | all-reduce                 | identity                   |
| gather_from   | all-gather the last dim    | keep this rank's slice     |
| scatter_to    | keep this rank's slice     | all-gather the last dim    |

Each is the identity when `group` is None (one process), so TP=1 runs the same code with no comms.
"""

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) > 1:
        tensor = tensor.contiguous()
        dist.all_reduce(tensor, group=group)
    return tensor


def _split_last_dim(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    return tensor.chunk(size, dim=-1)[group_rank(group)].contiguous()


def all_gather_last_dim(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # noqa: ANN001
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return grad, None


class _GatherFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return _split_last_dim(grad, ctx.group), None


class _ScatterToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return all_gather_last_dim(grad, ctx.group), None


def copy_to_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _ReduceFromTensorParallel.apply(x, group)


def gather_from_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _GatherFromTensorParallel.apply(x, group)


def scatter_to_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _ScatterToTensorParallel.apply(x, group)
