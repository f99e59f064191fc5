"""The loss head: output projection + cross-entropy, fused and chunked, over a vocab-sharded weight.

pico computes fp32 logits [tokens, V] and a cross-entropy over them; for its 50,304-token vocabulary those
logits (and the softmax autograd keeps for backward) outweigh every other activation of the model. Here the
logits never exist whole: tokens are taken `chunk_tokens` at a time, and for each chunk this rank forms its
[chunk, V/tp] logits (in the matmul dtype, read as fp32), the per-token statistics, the loss, and at once the
gradients of the hidden states and of its weight shard (softmax - one_hot, scaled by 1 / non-ignored tokens).
What stays alive for backward is one [tokens, d_model] gradient and one [V/tp, d_model] fp32 gradient; backward
only multiplies them by the incoming scalar (DeepSpeed's 1 / gradient accumulation). Computing the gradients in
the forward costs the same three matmuls per chunk that an unfused head does; recomputing the logits in backward
would add a fourth.

Under TP each rank holds V/tp rows of the weight. Per chunk, one all-gather of [3, chunk] per-token scalars (local
max, local sum of exp relative to it, target logit or 0) gives every rank the exact global log-sum-exp and target
logit (a log-sum-exp of the ranks' partial sums), so the vocabulary is never gathered. The hidden-state gradient is
this rank's partial sum over its vocab shard; the caller feeds the hidden states through copy_to_tensor_parallel,
whose backward sums it over TP.

Under sequence parallelism the head takes this rank's [S, D] token shard as it is and gathers it chunk by chunk:
chunk c is the c-th slice of every rank's shard (one all-gather of [chunk / tp, D]), and its hidden-state gradient
is reduce-scattered right away, summed over the vocab shards in the input's dtype, back to this rank's slice. So
neither the gathered [N, D] hidden states nor an [N, D] gradient exist; what stays for backward is this rank's
[S, D] gradient, the complete one.
"""

import functools

import torch
from torch.distributed import ProcessGroup

from megapico.parallel.layers import matmul_dtype
from megapico.parallel.mappings import all_gather_dim0, group_rank, group_size, reduce_scatter_dim0


def chunk_statistics(logits: torch.Tensor, local_target: torch.Tensor,
                     here: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token of a [c, V/tp] logits chunk (any dtype, read as fp32): the local max, the sum of exp(logit - max)
    and the target's logit (0 where the target is on another rank or ignored). Compiled: one fused pass."""
    logits = logits.float()
    local_max = logits.max(dim=-1).values
    local_sum = (logits - local_max.unsqueeze(-1)).exp().sum(dim=-1)
    target_logit = logits.gather(-1, local_target).squeeze(-1).masked_fill(~here, 0.0)
    return local_max, local_sum, target_logit


def chunk_logits_gradient(logits: torch.Tensor, log_sum_exp: torch.Tensor, local_target: torch.Tensor,
                          here: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(softmax - one_hot) * row_scale over this rank's columns, in the matmul dtype: the gradient of
    sum(row_scale * token loss) with respect to the logits chunk. Compiled: one fused pass writing it."""
    softmax = (logits.float() - log_sum_exp.unsqueeze(-1)).exp()
    one_hot = torch.zeros_like(softmax).scatter_(-1, local_target, here.float().unsqueeze(-1))
    return ((softmax - one_hot) * row_scale.unsqueeze(-1)).to(dtype)


class _EagerChunk:
    """The same two steps for eager mode, in place on one fp32 [c, V/tp] buffer (the logits, then exp(logit - max),
    then the gradient): unfused, the out-of-place form above would allocate and stream two more such buffers."""

    @staticmethod
    def statistics(logits: torch.Tensor, local_target: torch.Tensor, here: torch.Tensor):  # noqa: ANN205
        buffer = logits.float()
        local_max = buffer.max(dim=-1).values
        target_logit = buffer.gather(-1, local_target).squeeze(-1).masked_fill(~here, 0.0)
        buffer.sub_(local_max.unsqueeze(-1)).exp_()
        return (local_max, buffer.sum(dim=-1), target_logit), (buffer, local_max)

    @staticmethod
    def gradient(state, log_sum_exp: torch.Tensor, local_target: torch.Tensor, here: torch.Tensor,  # noqa: ANN001
                 row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buffer, local_max = state
        # exp(logit - lse) * row_scale = softmax * row_scale: one pass over the buffer, then the one-hot term
        grad = buffer.mul_(((local_max - log_sum_exp).exp() * row_scale).unsqueeze(-1))
        grad.scatter_add_(-1, local_target, -(here.float() * row_scale).unsqueeze(-1))
        return grad.to(dtype)


@functools.cache
def _compiled_kernels() -> tuple:
    """chunk_statistics and chunk_logits_gradient through torch.compile, built once on first use."""
    return torch.compile(chunk_statistics), torch.compile(chunk_logits_gradient)


class _CompiledChunk:
    """The compiled kernels over the untouched logits."""

    @staticmethod
    def statistics(logits: torch.Tensor, local_target: torch.Tensor, here: torch.Tensor):  # noqa: ANN205
        return _compiled_kernels()[0](logits, local_target, here), logits

    @staticmethod
    def gradient(logits, log_sum_exp: torch.Tensor, local_target: torch.Tensor, here: torch.Tensor,  # noqa: ANN001, ANN205
                 row_scale: torch.Tensor, dtype: torch.dtype):
        return _compiled_kernels()[1](logits, log_sum_exp, local_target, here, row_scale, dtype)


def _local_targets(labels: torch.Tensor, ignore_index: int, vocab_start: int,
                   vocab_local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid, target column in this rank's shard [c, 1], target is in this rank's shard) of a chunk's labels."""
    valid = labels != ignore_index
    local_target = labels - vocab_start
    here = valid & (local_target >= 0) & (local_target < vocab_local)
    return valid, local_target.clamp(0, vocab_local - 1).unsqueeze(-1), here


def _global_statistics(chunk, logits: torch.Tensor, local_target: torch.Tensor, here: torch.Tensor,  # noqa: ANN001
                       group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(log-sum-exp over the whole vocabulary, target logit, the chunk's state for its gradient) per token: one
    all-gather of three [c] scalars over TP, never the vocabulary."""
    (local_max, local_sum, target_logit), chunk_state = chunk.statistics(logits, local_target, here)
    if group_size(group) == 1:
        return local_max + local_sum.log(), target_logit, chunk_state
    maxes, sums, targets = all_gather_dim0(
        torch.stack((local_max, local_sum, target_logit)).unsqueeze(0), group).unbind(1)
    global_max = maxes.max(dim=0).values
    log_sum_exp = global_max + (sums * (maxes - global_max).exp()).sum(dim=0).log()
    return log_sum_exp, targets.sum(dim=0), chunk_state


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,  # noqa: ANN001
                group: ProcessGroup | None, ignore_index: int, chunk_tokens: int, compiled: bool,
                sequence_parallel: bool) -> torch.Tensor:
        dtype = matmul_dtype(x_ND)
        chunk = _CompiledChunk if compiled else _EagerChunk
        want_x_grad, want_w_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tp = group_size(group)
        sequence_parallel = sequence_parallel and tp > 1
        # rows of x_ND per chunk: under SP each rank contributes 1/tp of the chunk's tokens
        step = max(1, chunk_tokens // tp) if sequence_parallel else chunk_tokens
        labels_by_rank = labels_N.view(tp, -1) if sequence_parallel else labels_N.view(1, -1)  # rank j's tokens
        with torch.autocast(x_ND.device.type, enabled=False):
            x, weight = x_ND.to(dtype), weight_VD.to(dtype)
            vocab_local = weight.shape[0]
            vocab_start = group_rank(group) * vocab_local
            scale = 1.0 / (labels_N != ignore_index).sum().clamp(min=1).float()  # a device scalar: no host sync
            grad_x = torch.empty_like(x_ND) if want_x_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w_grad else None
            loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            for start in range(0, x.shape[0], step):
                x_c = x[start:start + step]
                if sequence_parallel:
                    x_c = all_gather_dim0(x_c, group)  # [tp * c, D]: this slice of every rank's tokens
                labels_c = labels_by_rank[:, start:start + step].reshape(-1)
                valid, local_target, here = _local_targets(labels_c, ignore_index, vocab_start, vocab_local)
                logits = x_c @ weight.t()  # [c, V/tp] in the matmul dtype; read as fp32 below
                log_sum_exp, target_logit, chunk_state = _global_statistics(chunk, logits, local_target, here, group)
                loss_sum += (log_sum_exp - target_logit).masked_fill(~valid, 0.0).sum()
                if grad_x is None and grad_w is None:
                    continue
                grad_logits = chunk.gradient(chunk_state, log_sum_exp, local_target, here, valid.float() * scale,
                                             dtype)
                del logits, chunk_state
                if grad_x is not None:
                    grad_x_c = grad_logits @ weight
                    if sequence_parallel:  # summed over the vocab shards, kept for this rank's slice
                        grad_x_c = reduce_scatter_dim0(grad_x_c.to(grad_x.dtype), group)
                    grad_x[start:start + step] = grad_x_c
                if grad_w is None:
                    continue
                if dtype == torch.float32:
                    grad_w.addmm_(grad_logits.t(), x_c)
                else:  # each chunk's bf16 product (fp32-accumulated in the matmul) summed in fp32
                    grad_w += (grad_logits.t() @ x_c).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight_VD.dtype
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001
        grad_x, grad_w = ctx.saved_tensors
        grad_x = grad_x * grad_loss.to(grad_x.dtype) if grad_x is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(x_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                                        group: ProcessGroup | None = None, ignore_index: int = -100,
                                        chunk_tokens: int = 1024, compiled: bool = False,
                                        sequence_parallel: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not ignore_index (0 when there are none) of the logits
    x @ weight.T, where `weight` holds this rank's V/tp rows of the output projection; fp32 statistics.
    compiled: run the per-chunk elementwise work as torch.compile'd kernels. sequence_parallel: x_ND is this rank's
    [N / tp, D] block of the N tokens (labels_N all N of them), gathered chunk by chunk."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if sequence_parallel and labels_N.numel() != x_ND.shape[0] * group_size(group):
        raise ValueError(f"sequence_parallel: {labels_N.numel()} labels for {x_ND.shape[0]} tokens on each of "
                         f"{group_size(group)} ranks; pass this rank's token block and the labels of all of them")
    return _LinearCrossEntropy.apply(x_ND, weight_VD, labels_N, group, ignore_index, chunk_tokens, compiled,
                                     sequence_parallel)


@torch.no_grad()
def vocab_parallel_token_nll(x_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
                             group: ProcessGroup | None = None, ignore_index: int = -100,
                             chunk_tokens: int = 1024) -> torch.Tensor:
    """Per-token cross-entropy [N] in fp32 (0 where the label is ignore_index) of the logits x @ weight.T, with the
    same chunked vocab-parallel statistics as the loss head and no gradients: evaluations that need each text's
    own NLL (pico's per-text perplexity). x_ND holds all N tokens on every TP rank."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    dtype = matmul_dtype(x_ND)
    with torch.autocast(x_ND.device.type, enabled=False):
        x, weight = x_ND.to(dtype), weight_VD.to(dtype)
        vocab_local = weight.shape[0]
        vocab_start = group_rank(group) * vocab_local
        nll = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], chunk_tokens):
            valid, local_target, here = _local_targets(labels_N[start:start + chunk_tokens], ignore_index,
                                                       vocab_start, vocab_local)
            log_sum_exp, target_logit, _ = _global_statistics(_EagerChunk, x[start:start + chunk_tokens] @ weight.t(),
                                                              local_target, here, group)
            nll[start:start + chunk_tokens] = (log_sum_exp - target_logit).masked_fill(~valid, 0.0)
    return nll
