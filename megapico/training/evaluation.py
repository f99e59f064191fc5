"""Held-out perplexity, in either of two definitions (evaluation.perplexity), over a set that is the run's, not the
layout's: the first evaluation.max_sequences sequences of the eval set (0: all), whatever the TP x DP layout, the
micro batch or the resume. Each DP rank scores its part of that set and sums on the device; one all-reduce over
DP and one host read end the evaluation, so two layouts at the same weights differ only in summation order.

- tokens: exp(mean token NLL) over the evaluated seq_len samples, DP ranks taking contiguous shares (eval_shard),
  NLLs summed in fp64.
- pico: pico-train's Paloma number, HF evaluate's perplexity metric with add_start_token=False and
  max_length=max_seq_len: each eval document is one text, its first max_seq_len tokens are scored with no start
  token (len - 1 predictions), perplexity_i = exp(mean NLL of text i), the value is the mean over texts. Texts
  are batched by length (neighbours in length order, padding bounded by their difference and masked out), the
  batches dealt out over DP; each rank sums its texts' perplexities.
Under sequence parallelism the TP ranks split a batch's tokens: a short last micro batch is padded with masked
rows to the full micro batch, and a batch of texts with masked columns to a width the TP size divides.
"""

import math

import numpy as np
import torch
import torch.distributed as dist

from megapico.data.pretokenized_dataset import TextDocuments, length_batches
from megapico.data.sampler import collate_samples
from megapico.parallel import ParallelState


def evaluated_count(total: int, max_sequences: int) -> int:
    """How many sequences an evaluation scores: the first max_sequences of the eval set's `total`; 0 or a budget
    past its end: every one, once."""
    return min(max_sequences, total) if max_sequences > 0 else total


def eval_shard(total: int, max_sequences: int, dp_rank: int, dp_size: int) -> range:
    """This DP rank's contiguous share of the evaluated sequences (shares differ by at most one). A pure function
    of the config and the eval set: the union over the ranks is the same at every layout and every resume."""
    count = evaluated_count(total, max_sequences)
    return range(count * dp_rank // dp_size, count * (dp_rank + 1) // dp_size)


def micro_batch(samples: list[np.ndarray], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [rows, seq_len]: these samples, then masked rows (labels -100), so a short last micro
    batch keeps the shape the compiled blocks were built for and a token count sequence parallelism can split."""
    input_ids, labels = collate_samples(samples)
    extra = rows - len(samples)
    return (torch.cat((input_ids, input_ids.new_zeros(extra, input_ids.shape[1]))),
            torch.cat((labels, labels.new_full((extra, labels.shape[1]), -100))))


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, dataset, micro_batch_size: int, parallel: ParallelState,  # noqa: ANN001
                        max_sequences: int = 0, device: torch.device | None = None) -> float:
    """exp(mean token NLL) over the first max_sequences samples (0: all); every rank of a TP group reads its DP
    rank's share in micro batches (the last one padded with masked rows); `model` needs token_nll."""
    was_training = model.training
    model.eval()
    shard = eval_shard(len(dataset), max_sequences, parallel.dp_rank, parallel.dp_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed NLL, tokens
    for start in range(shard.start, shard.stop, micro_batch_size):
        samples = [dataset[index] for index in range(start, min(start + micro_batch_size, shard.stop))]
        input_ids, labels = (t.to(device, non_blocking=True) for t in micro_batch(samples, micro_batch_size))
        nll = model.token_nll(input_ids, labels).double()
        totals += torch.stack((nll.sum(), (labels != -100).sum().double()))  # on the device: no sync per batch
    if parallel.dp_group is not None:
        dist.all_reduce(totals, group=parallel.dp_group)
    model.train(was_training)
    nll, tokens = totals.tolist()  # the one host sync of the evaluation
    return math.exp(nll / tokens)


def padded_batch(texts: TextDocuments, indices: np.ndarray, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [b, width] of these texts, right-padded to the longest text's predictions rounded up to
    a multiple of `multiple`: labels -100 past each text's end, so a causal model scores every text exactly as it
    would alone."""
    width = -(-(int(texts.lengths[indices].max()) - 1) // multiple) * multiple
    tokens = np.zeros((len(indices), width), dtype=np.int64)
    labels = np.full((len(indices), width), -100, dtype=np.int64)
    for row, index in enumerate(indices):
        ids = texts[index]
        tokens[row, :len(ids) - 1] = ids[:-1]
        labels[row, :len(ids) - 1] = ids[1:]
    return torch.from_numpy(tokens), torch.from_numpy(labels)


@torch.no_grad()
def evaluate_text_perplexity(model: torch.nn.Module, texts: TextDocuments, tokens_per_batch: int,
                             parallel: ParallelState, max_sequences: int = 0,
                             device: torch.device | None = None) -> float:
    """pico's Paloma perplexity (module docstring) over the first max_sequences texts (0: all); `model` needs
    token_nll."""
    was_training = model.training
    model.eval()
    count = evaluated_count(len(texts), max_sequences)
    total = torch.zeros((), dtype=torch.float64, device=device)  # this rank's summed per-text perplexities
    batches = length_batches(texts.lengths[:count], tokens_per_batch, equal_lengths=False)
    for indices in batches[parallel.dp_rank::parallel.dp_size]:
        input_ids, labels = (t.to(device, non_blocking=True) for t in padded_batch(texts, indices, parallel.tp_size))
        nll = model.token_nll(input_ids, labels).double()
        predictions = (labels != -100).sum(dim=1)
        total += (nll.sum(dim=1) / predictions).exp().sum()
    if parallel.dp_group is not None:
        dist.all_reduce(total, group=parallel.dp_group)
    model.train(was_training)
    return total.item() / count  # the one host sync of the evaluation
