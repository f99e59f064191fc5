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
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    scatter_to_tensor_parallel,
    vocab_parallel_cross_entropy,
)

CONFIG = dataclasses.replace(MODEL_PRESETS["tiny"], n_layers=2, max_seq_len=64)


def _compare_with_tp1(rank, world_size, tp_size):
    state = ParallelState.build(tp_size)
    torch.manual_seed(42)
    sharded = PicoDecoder(CONFIG, state.tp_group)
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


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_matches_tp1(tp_size, tmp_path):
    result = run_distributed(_compare_with_tp1, tp_size, tp_size, tmp_path=tmp_path)
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


def _mappings_and_cross_entropy(rank, world_size):
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
    # vocab-parallel cross-entropy against torch's, values and gradients, with ignore_index
    logits = torch.randn(6, 5, 16) * 3
    target = torch.randint(0, 16, (6, 5))
    target[0, :3] = -100
    logits_ref = logits.clone().requires_grad_()
    loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), target.flatten(), reduction="none").view(6, 5)
    weights = torch.rand(6, 5)
    (loss_ref * weights).sum().backward()
    logits_local = logits.chunk(world_size, dim=-1)[state.tp_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits_local, target, group)
    (loss * weights).sum().backward()
    grad_ref_local = logits_ref.grad.chunk(world_size, dim=-1)[state.tp_rank]
    return dict(scatter_gather_ok=scatter_gather_ok, reduce_ok=reduce_ok,
                loss_diff=(loss - loss_ref).abs().max().item(),
                grad_diff=(logits_local.grad - grad_ref_local).abs().max().item())


def test_mappings_and_vocab_parallel_cross_entropy(tmp_path):
    result = run_distributed(_mappings_and_cross_entropy, 2, tmp_path=tmp_path)
    assert result["scatter_gather_ok"] and result["reduce_ok"]
    assert result["loss_diff"] < 1e-5 and result["grad_diff"] < 1e-6


def test_single_process_cross_entropy_matches_torch():
    logits = (torch.randn(4, 9, 50) * 4).requires_grad_()
    target = torch.randint(0, 50, (4, 9))
    target[2] = -100
    loss = vocab_parallel_cross_entropy(logits, target)
    loss.sum().backward()
    reference_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_logits.flatten(0, 1), target.flatten(), reduction="none").view(4, 9)
    reference.sum().backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.grad, reference_logits.grad, atol=1e-6, rtol=0)
    assert torch.all(loss[2] == 0)
