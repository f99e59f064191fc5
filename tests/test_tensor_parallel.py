"""TP=2 and TP=4 (gloo processes) against TP=1: initial weights, logits, loss, gathered gradients."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed

from megapico.config import MODEL_PRESETS
from megapico.model import PicoDecoder, gather_full_state_dict, gather_full_tensor, partition_dim, shard_state_dict
from megapico.parallel import (
    ParallelState,
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
    scatter_to_tensor_parallel,
    vocab_parallel_linear_cross_entropy,
)

CONFIG = dataclasses.replace(MODEL_PRESETS["tiny"], n_layers=2, max_seq_len=64)


def _compare_with_tp1(rank, world_size, tp_size, sequence_parallel=False):
    state = ParallelState.build(tp_size)
    torch.manual_seed(42)
    sharded = PicoDecoder(CONFIG, state.tp_group, sequence_parallel=sequence_parallel, loss_chunk_tokens=20)
    torch.manual_seed(42)
    full = PicoDecoder(CONFIG)  # every rank also builds the one-process model as its reference

    gathered = gather_full_state_dict(sharded)
    init_equal = all(torch.equal(gathered[k], v) for k, v in full.state_dict().items())
    for name, param in sharded.named_parameters():  # the layers and the sharding plan agree
        assert getattr(param, "partition_dim", None) == partition_dim(name), name

    torch.manual_seed(0)
    input_ids = torch.randint(0, CONFIG.vocab_size, (2, 24))
    labels = torch.randint(0, CONFIG.vocab_size, (2, 24))
    labels[1, :5] = -100
    logits_diff = (sharded(input_ids) - full(input_ids)).abs().max().item()
    loss_tp = sharded(input_ids, labels)
    loss_tp.backward()
    loss_full = full(input_ids, labels)
    loss_full.backward()
    grad_diff = 0.0
    full_params = dict(full.named_parameters())
    for name, param in sharded.named_parameters():
        grad = gather_full_tensor(name, param.grad, state.tp_group)
        grad_diff = max(grad_diff, (grad - full_params[name].grad).abs().max().item())
    local = shard_state_dict(full.state_dict(), state.tp_rank, tp_size)
    shard_equal = all(torch.equal(local[k], v) for k, v in sharded.state_dict().items())
    return dict(init_equal=init_equal, logits_diff=logits_diff, loss_diff=abs(loss_tp.item() - loss_full.item()),
                grad_diff=grad_diff, shard_equal=shard_equal)


@pytest.mark.parametrize("tp_size,sequence_parallel", [(2, False), (4, False), (2, True), (4, True)])
def test_tp_matches_tp1(tp_size, sequence_parallel, tmp_path):
    """Sharded init, logits, loss and every gathered gradient (norm weights included) equal TP=1's, with and
    without sequence parallelism."""
    result = run_distributed(_compare_with_tp1, tp_size, tp_size, sequence_parallel, tmp_path=tmp_path)
    assert result["init_equal"], "TP-sharded init differs from the TP=1 init for the same seed"
    assert result["shard_equal"]
    assert result["logits_diff"] < 1e-5
    assert result["loss_diff"] < 1e-5
    assert result["grad_diff"] < 1e-5


def _groups(rank, world_size):
    state = ParallelState.build(tp_size=2)
    tp_members = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(tp_members, torch.tensor([float(rank)]), group=state.tp_group)
    dp_members = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(dp_members, torch.tensor([float(rank)]), group=state.dp_group)
    row = dict(tp_rank=state.tp_rank, dp_rank=state.dp_rank, tp=[int(t) for t in tp_members],
               dp=[int(t) for t in dp_members], mpu=(state.get_model_parallel_rank(),
                                                    state.get_model_parallel_world_size(),
                                                    state.get_data_parallel_rank(),
                                                    state.get_data_parallel_world_size(),
                                                    state.get_data_parallel_group_ranks()))
    rows = [None] * world_size
    dist.all_gather_object(rows, row)
    return rows


def test_tp2_dp2_groups(tmp_path):
    rows = run_distributed(_groups, 4, tmp_path=tmp_path)
    assert [(r["tp_rank"], r["dp_rank"]) for r in rows] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [r["tp"] for r in rows] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # TP ranks adjacent
    assert [r["dp"] for r in rows] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert rows[3]["mpu"] == (1, 2, 1, 2, [1, 3])


def _mappings(rank, world_size):
    state = ParallelState.build(tp_size=world_size)
    group = state.tp_group
    torch.manual_seed(0)
    full = torch.randn(3, 8, requires_grad=True)
    upstream = torch.randn(3, 8)
    # scatter then gather is the identity, forward and backward
    local = scatter_to_tensor_parallel(full, group)
    assert local.shape == (3, 8 // world_size)
    (gather_from_tensor_parallel(local, group) * upstream).sum().backward()
    scatter_gather_ok = torch.allclose(full.grad, upstream)
    # copy_to's backward and reduce_from's forward all-reduce
    x = torch.full((2,), float(rank + 1), requires_grad=True)
    reduced = reduce_from_tensor_parallel(copy_to_tensor_parallel(x, group), group)
    reduced.sum().backward()
    total = sum(range(1, world_size + 1))
    reduce_ok = torch.equal(reduced, torch.full((2,), float(total))) and torch.equal(x.grad, torch.full((2,), 2.0))
    # sequence parallel: gather's forward is the concatenation of the token blocks, its backward the
    # reduce-scatter of the gradient; reduce-scatter's forward sums and keeps this rank's block
    block = torch.full((2, 3), float(rank), requires_grad=True)
    gathered = gather_from_sequence_parallel(block, group)
    expected = torch.cat([torch.full((2, 3), float(r)) for r in range(world_size)])
    (gathered * (rank + 1)).sum().backward()
    sp_gather_ok = torch.equal(gathered, expected) and torch.equal(block.grad, torch.full((2, 3), float(total)))
    partial = torch.arange(2.0 * world_size).view(world_size * 2, 1) * (rank + 1)
    scattered = reduce_scatter_to_sequence_parallel(partial, group)
    sp_scatter_ok = torch.equal(scattered, (torch.arange(2.0 * world_size).view(-1, 1) * total)[2 * rank:2 * rank + 2])
    return dict(scatter_gather_ok=scatter_gather_ok, reduce_ok=reduce_ok, sp_gather_ok=sp_gather_ok,
                sp_scatter_ok=sp_scatter_ok)


def test_mappings(tmp_path):
    result = run_distributed(_mappings, 2, tmp_path=tmp_path)
    assert all(result.values()), result


def _unfused_head(x, weight, labels):
    """pico's head as written: fp32 logits [N, V], then the mean cross-entropy over non-ignored tokens."""
    logits = F.linear(x, weight).float()
    token_loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return token_loss / (labels != -100).sum().clamp(min=1)


def _fused_head_against_unfused(rank, world_size, tokens, chunk, ignored, compiled=False, sequence_parallel=False):
    state = ParallelState.build(tp_size=world_size) if world_size > 1 else None
    group = state.tp_group if state else None
    torch.manual_seed(1)
    x = torch.randn(tokens, 24) * 2
    weight = torch.randn(64, 24) * 0.5
    labels = torch.randint(0, 64, (tokens,))
    labels[ignored] = -100
    x_ref, w_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_ref = _unfused_head(x_ref, w_ref, labels)
    (loss_ref * 0.5).backward()  # an upstream scale, as DeepSpeed's 1 / gradient accumulation
    w_local = weight.chunk(world_size)[rank].clone().requires_grad_()
    if sequence_parallel:  # this rank's block of the tokens, as the SP residual stream holds them
        x_ours = x.chunk(world_size)[rank].clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(x_ours, w_local, labels, group, chunk_tokens=chunk,
                                                   sequence_parallel=True)
        expected_grad_x = x_ref.grad.chunk(world_size)[rank]
    else:
        x_ours = x.clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(copy_to_tensor_parallel(x_ours, group), w_local, labels, group,
                                                   chunk_tokens=chunk, compiled=compiled)
        expected_grad_x = x_ref.grad
    (loss * 0.5).backward()
    return dict(loss=(loss - loss_ref).abs().item(), loss_value=loss.item(),
                grad_x=(x_ours.grad - expected_grad_x).abs().max().item(),
                grad_w=(w_local.grad - w_ref.grad.chunk(world_size)[rank]).abs().max().item())


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("tokens,chunk,ignored", [(50, 16, slice(3, 11)), (50, 64, slice(0, 0)),
                                                  (7, 3, slice(0, 7))])
def test_fused_chunked_head_equals_the_unfused_one(world_size, tokens, chunk, ignored, tmp_path):
    """Loss, hidden-state and weight-shard gradients within 1e-6 (fp32): ignored tokens, a chunk size that does
    not divide the tokens, one chunk for all, every token ignored (loss 0, gradients 0), TP=1/2/4."""
    if world_size == 1:
        result = _fused_head_against_unfused(0, 1, tokens, chunk, ignored)
    else:
        result = run_distributed(_fused_head_against_unfused, world_size, tokens, chunk, ignored, tmp_path=tmp_path)
    assert result["loss"] <= 1e-6 and result["grad_x"] <= 1e-6 and result["grad_w"] <= 1e-6, result
    if ignored == slice(0, 7):
        assert result["loss_value"] == 0.0


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("tokens,chunk,ignored", [(48, 16, slice(3, 11)), (48, 40, slice(0, 0)),
                                                  (8, 3, slice(0, 8))])
def test_sequence_parallel_head_gathers_the_shard_chunk_by_chunk(world_size, tokens, chunk, ignored, tmp_path):
    """Under SP the head takes each rank's token block: the unfused head's loss (to fp32 rounding of a sum taken in
    another order, 1e-5 of ~13), and each rank gets its own tokens' complete hidden-state gradient (1e-6), with
    chunks that do not divide the block and chunks smaller than the TP size (one token per rank per chunk)."""
    result = run_distributed(_fused_head_against_unfused, world_size, tokens, chunk, ignored, False, True,
                             tmp_path=tmp_path)
    assert result["loss"] <= 1e-5 and result["grad_x"] <= 1e-6 and result["grad_w"] <= 1e-6, result
    if ignored == slice(0, 8):
        assert result["loss_value"] == 0.0


def test_sequence_parallel_head_rejects_labels_that_do_not_match_the_shards():
    with pytest.raises(ValueError, match="12 labels for 4 tokens on each of 1 ranks"):
        vocab_parallel_linear_cross_entropy(torch.randn(4, 8), torch.randn(16, 8), torch.zeros(12, dtype=torch.long),
                                            sequence_parallel=True)


def test_compiled_head_kernels_equal_the_unfused_head():
    result = _fused_head_against_unfused(0, 1, 50, 16, slice(3, 11), compiled=True)
    assert result["loss"] <= 1e-5 and result["grad_x"] <= 1e-6 and result["grad_w"] <= 1e-6, result


def _sp_linears_under_autocast(rank, world_size):
    """Two column-parallel projections of one input under bf16 autocast, with SP (this rank's fp32 [S, D] tokens)
    against without (the full [N, D] tokens through autocast's own linears)."""
    from megapico.parallel import ColumnParallelLinear, column_parallel_linears

    group = ParallelState.build(tp_size=world_size).tp_group
    torch.manual_seed(0)
    layers = [ColumnParallelLinear(16, 8, tp_group=group, copy_input=False) for _ in range(2)]
    full = torch.randn(4 * world_size, 16)
    upstream = [torch.randn(4 * world_size, 8 // world_size) for _ in layers]
    results = {}
    for sequence_parallel in (False, True):
        x = (full.chunk(world_size)[rank] if sequence_parallel else full).clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, kept=saved: kept.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = column_parallel_linears(x, group, sequence_parallel, *layers)
        sum((out.float() * grad).sum() for out, grad in zip(outputs, upstream, strict=True)).backward()
        grad_x = x.grad if sequence_parallel else x.grad.chunk(world_size)[rank]
        results[sequence_parallel] = dict(outputs=outputs, grad_x=grad_x, saved=saved,
                                          grad_w=[layer.weight.grad.clone() for layer in layers])
        for layer in layers:
            layer.weight.grad = None
    plain, sp = results[False], results[True]
    return dict(outputs_equal=all(torch.equal(a, b) for a, b in zip(plain["outputs"], sp["outputs"], strict=True)),
                output_dtypes={out.dtype for out in sp["outputs"]},
                saved=[(tuple(t.shape), t.dtype) for t in sp["saved"] if t.dim() == 2 and t.shape[1] == 16
                       and t.data_ptr() not in {layer.weight.data_ptr() for layer in layers}],
                grad_x_gap=(sp["grad_x"] - plain["grad_x"]).abs().max().item(),
                grad_w_gap=max((a - b).abs().max().item() for a, b in zip(plain["grad_w"], sp["grad_w"], strict=True)))


def test_sequence_parallel_linears_gather_and_save_the_bf16_shard(tmp_path):
    """Under bf16-mixed the SP projections cast this rank's tokens to bf16 before the all-gather and keep only that
    bf16 [S, D] shard: autocast's outputs bit for bit, its gradients (fp32 sums of bf16 products) to fp32 rounding."""
    result = run_distributed(_sp_linears_under_autocast, 2, tmp_path=tmp_path)
    assert result["outputs_equal"] and result["output_dtypes"] == {torch.bfloat16}
    assert result["saved"] == [((4, 16), torch.bfloat16)]
    assert result["grad_x_gap"] <= 1e-6 and result["grad_w_gap"] <= 1e-6, result


def _sp_under_autocast(rank, world_size):
    """bf16-mixed at TP=2: the sequence-parallel model against the plain TP one, both under torch.autocast."""
    state = ParallelState.build(tp_size=world_size)
    models = {}
    for sequence_parallel in (False, True):
        torch.manual_seed(42)
        models[sequence_parallel] = PicoDecoder(CONFIG, state.tp_group, sequence_parallel=sequence_parallel)
    torch.manual_seed(0)
    input_ids = torch.randint(0, CONFIG.vocab_size, (2, 24))
    labels = torch.randint(0, CONFIG.vocab_size, (2, 24))
    losses = {}
    for sequence_parallel, model in models.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[sequence_parallel] = model(input_ids, labels)
        losses[sequence_parallel].backward()  # outside autocast, as the trainer does
    plain, sp = (dict(models[flag].named_parameters()) for flag in (False, True))
    grad_gap = max(((sp[name].grad - plain[name].grad).abs().max() / plain[name].grad.abs().max()).item()
                   for name in plain)
    dtypes = {param.grad.dtype for param in sp.values()}
    return dict(loss_gap=abs(losses[True].item() - losses[False].item()), grad_gap=grad_gap, dtypes=dtypes)


def test_sequence_parallel_under_bf16_autocast(tmp_path):
    result = run_distributed(_sp_under_autocast, 2, tmp_path=tmp_path)
    assert result["dtypes"] == {torch.float32}  # fp32 weights keep fp32 gradients
    assert result["loss_gap"] <= 1e-2 and result["grad_gap"] <= 5e-2, result
