"""The autograd pairs that move activations across the tensor-parallel group (Megatron's mappings).

| function                         | forward                       | backward                      |
|----------------------------------|-------------------------------|-------------------------------|
| copy_to_tensor_parallel          | identity                      | all-reduce the gradient       |
| reduce_from_tensor_parallel      | all-reduce                    | identity                      |
| gather_from_tensor_parallel      | all-gather the last dim       | keep this rank's slice        |
| scatter_to_tensor_parallel       | keep this rank's slice        | all-gather the last dim       |
| gather_from_sequence_parallel    | all-gather the token dim (0)  | reduce-scatter the token dim  |
| reduce_scatter_to_sequence_parallel | reduce-scatter the token dim | all-gather the token dim     |

The sequence-parallel pair (Megatron's SP) works on flat [tokens, ...] tensors whose dim 0 is split over the TP
ranks in contiguous blocks, so both collectives move contiguous memory. Each is the identity when `group` is None
(one process), so TP=1 runs the same code with no comms. gloo has no reduce-scatter: there it is an all-reduce
and a slice (CPU tests only; NCCL gets the real collective).
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


def all_gather_dim0(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """[n, ...] from every rank -> [tp * n, ...], rank order."""
    size = group_size(group)
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    if dist.get_backend(group) == "gloo":  # gloo implements only the list form
        dist.all_gather(list(out.chunk(size)), tensor, group=group)
    else:  # all_gather_single is torch 2.13's name (all_gather_into_tensor is deprecated there); older torch has only
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, tensor, group=group)
    return out


def reduce_scatter_dim0(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum [n, ...] over the ranks and keep this rank's contiguous [n / tp, ...] block."""
    size = group_size(group)
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    if dist.get_backend(group) == "gloo":
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor.chunk(size)[group_rank(group)].contiguous()
    out = torch.empty((tensor.shape[0] // size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.reduce_scatter_tensor(out, tensor, group=group)
    return out


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


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return reduce_scatter_dim0(grad, ctx.group), None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        return all_gather_dim0(grad, ctx.group), None


def copy_to_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _ReduceFromTensorParallel.apply(x, group)


def gather_from_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _GatherFromTensorParallel.apply(x, group)


def scatter_to_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _ScatterToTensorParallel.apply(x, group)


def gather_from_sequence_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _GatherFromSequenceParallel.apply(x, group)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group is None else _ReduceScatterToSequenceParallel.apply(x, group)
