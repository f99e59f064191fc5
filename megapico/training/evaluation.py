"""Held-out perplexity, in either of two definitions (evaluation.perplexity):

- tokens: exp(mean token NLL) over seq_len samples of the eval set, DP ranks taking disjoint micro batches.
- pico: pico-train's Paloma number, HF evaluate's perplexity metric with add_start_token=False and
  max_length=max_seq_len: each eval document is one text, its first max_seq_len tokens are scored with no start
  token (len - 1 predictions), perplexity_i = exp(mean NLL of text i), the value is the mean over texts. Texts
  are batched by length (neighbours in length order, padding bounded by their difference and masked out), the
  batches dealt out over DP; each rank sums its texts' perplexities on the device, and one all-reduce and one
  host read end the evaluation.
"""

import math

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from megapico.data.pretokenized_dataset import TextDocuments
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


def padded_batch(texts: TextDocuments, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [b, longest - 1] of these texts, right-padded: labels -100 past each text's end, so a
    causal model scores every text exactly as it would alone."""
    longest = int(texts.lengths[indices].max())
    tokens = np.zeros((len(indices), longest), dtype=np.int64)
    labels = np.full((len(indices), longest - 1), -100, dtype=np.int64)
    for row, index in enumerate(indices):
        ids = texts[index]
        tokens[row, :len(ids)] = ids
        labels[row, :len(ids) - 1] = ids[1:]
    return torch.from_numpy(tokens[:, :-1]), torch.from_numpy(labels)


@torch.no_grad()
def evaluate_text_perplexity(model: torch.nn.Module, texts: TextDocuments, tokens_per_batch: int,
                             parallel: ParallelState, device: torch.device | None = None) -> float:
    """pico's Paloma perplexity (module docstring): mean over texts of exp(mean NLL); `model` needs token_nll."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # this rank's summed per-text perplexities
    batches = texts.length_batches(tokens_per_batch, equal_lengths=False)
    for indices in batches[parallel.dp_rank::parallel.dp_size]:
        input_ids, labels = (t.to(device, non_blocking=True) for t in padded_batch(texts, indices))
        nll = model.token_nll(input_ids, labels).double()
        predictions = (labels != -100).sum(dim=1)
        total += (nll.sum(dim=1) / predictions).exp().sum()
    if parallel.dp_group is not None:
        dist.all_reduce(total, group=parallel.dp_group)
    model.train(was_training)
    return total.item() / len(texts)  # the one host sync of the evaluation
