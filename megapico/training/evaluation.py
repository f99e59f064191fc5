"""Perplexity = exp(mean token NLL) over an eval set, every DP rank taking its slice, summed over DP."""

import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from megapico.data.sampler import PretrainingSampler, collate_samples
from megapico.parallel import ParallelState


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, dataset, micro_batch_size: int, parallel: ParallelState,  # noqa: ANN001
                        max_batches: int = 0, device: torch.device | None = None) -> float:
    """Every rank of a TP group reads the same batch; DP ranks read disjoint ones. max_batches=0: all."""
    was_training = model.training
    model.eval()
    sampler = PretrainingSampler(len(dataset), 0, micro_batch_size, parallel.dp_rank, parallel.dp_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed NLL, tokens
    for index, (input_ids, labels) in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        labels = labels.to(device, non_blocking=True)
        tokens = (labels != -100).sum().double()
        mean_nll = model(input_ids.to(device, non_blocking=True), labels)
        totals += torch.stack((mean_nll.double() * tokens, tokens))  # on the device: no sync per batch
    if parallel.dp_group is not None:
        dist.all_reduce(totals, group=parallel.dp_group)
    model.train(was_training)
    nll, tokens = totals.tolist()  # the one host sync of the evaluation
    if tokens == 0:
        raise ValueError("the eval set has fewer samples than one micro batch per data-parallel rank")
    return math.exp(nll / tokens)
