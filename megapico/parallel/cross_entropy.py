"""Cross-entropy over vocab-sharded logits that never assembles the full vocabulary on one rank.

Each rank holds logits[:, V/tp]; three all-reduces of per-token scalars (max, target logit, sum of
exp) give the exact softmax cross-entropy. The backward is the analytic softmax - one_hot, computed on
the local shard.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from megapico.parallel.mappings import group_rank, group_size


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None) -> None:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None,  # noqa: ANN001
                ignore_index: int) -> torch.Tensor:
        vocab_local = logits.shape[-1]
        vocab_start = group_rank(group) * vocab_local

        logits_max = logits.max(dim=-1).values
        _all_reduce(logits_max, dist.ReduceOp.MAX, group)
        shifted = logits - logits_max.unsqueeze(-1)

        local_target = target - vocab_start
        not_here = (local_target < 0) | (local_target >= vocab_local)
        local_target = local_target.masked_fill(not_here, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(not_here, 0.0)
        _all_reduce(target_logit, dist.ReduceOp.SUM, group)

        exp = shifted.exp_()  # reuse the shifted buffer: it becomes the softmax numerator
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)

        ignored = target == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, not_here, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001
        softmax, local_target, not_here, ignored = ctx.saved_tensors
        grad = softmax.clone()
        one_hot_here = (~not_here).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -one_hot_here)
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 group: ProcessGroup | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [...] (0 where target == ignore_index) from local logits [..., V/tp], in fp32.

    Without a TP group the logits are the whole vocabulary and torch's fused kernel does the same math
    in fewer passes over the [tokens, V] tensor.
    """
    shape = target.shape
    if group_size(group) == 1:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, reduction="none").view(shape)
    loss = _VocabParallelCrossEntropy.apply(logits.float().reshape(-1, logits.shape[-1]),
                                            target.reshape(-1), group, ignore_index)
    return loss.view(shape)
