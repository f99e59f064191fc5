"""pico-train's data order: every document of a prefix is one sequence, read in document order.

pico-lm/pretokenized-dolma is parquet rows of 2049 token ids (2048 inputs + the shifted last label), which
pico-train reads in file and row order with no shuffle: optimizer step s (0-based) trains rows [G s, G (s+1)).
`tools/preprocess_data.py --json-keys input_ids` writes those rows, in that order, one document each; this
dataset hands them out unchanged (`data.samples=pretokenized`), so the sampler's global batch k is exactly
pico's batch k at any DP x accumulation layout.

`TextDocuments` is the other use of documents-as-sequences: an eval set (pico's Paloma texts, the
learning-dynamics val rows) whose documents keep their own lengths.
"""

import numpy as np

from megapico.data.indexed_dataset import DataError, IndexedDataset, check_vocabulary


class PretokenizedDataset:
    """Document i of `indexed` is training sample i: exactly seq_len + 1 tokens (input row[:-1], labels row[1:]),
    each id checked to fit vocab_size where given (check_vocabulary)."""

    def __init__(self, indexed: IndexedDataset, seq_len: int, vocab_size: int | None = None) -> None:
        lengths = indexed.sequence_lengths
        wrong = np.flatnonzero(lengths != seq_len + 1)  # one vectorised pass over the .idx
        if len(wrong):
            first = int(wrong[0])
            raise DataError(f"{indexed.prefix}: document {first} has {int(lengths[first])} tokens, but "
                            f"data.samples=pretokenized needs every document to be data.seq_len + 1 = {seq_len + 1} "
                            f"({len(wrong):,} of {len(lengths):,} differ); set data.seq_len to the rows' length "
                            f"minus 1, or use data.samples=megatron")
        self.indexed, self.seq_len, self.vocab_size = indexed, seq_len, vocab_size

    def steps_covered(self, global_batch: int) -> int:
        """Whole optimizer steps of `global_batch` rows the prefix holds."""
        return len(self) // global_batch

    def __len__(self) -> int:
        return len(self.indexed)

    def __getitem__(self, index: int) -> np.ndarray:
        row = np.asarray(self.indexed.get(int(index)), dtype=np.int64)
        check_vocabulary(row, self.vocab_size, self.indexed.prefix, int(index))
        return row


class TextDocuments:
    """Each document of a prefix as one sequence at its own length, cut to its first `max_tokens` tokens.

    Sequences shorter than two tokens score nothing (no prediction without a start token) and are an error,
    as in HF evaluate's perplexity."""

    def __init__(self, indexed: IndexedDataset, max_tokens: int, what: str) -> None:
        lengths = np.minimum(indexed.sequence_lengths.astype(np.int64), max_tokens)
        short = np.flatnonzero(lengths < 2)
        if len(short):
            first = int(short[0])
            raise DataError(f"{indexed.prefix}: document {first} has {int(lengths[first])} token(s); every {what} "
                            f"text needs at least 2 (rebuild the prefix without empty or one-token texts)")
        self.indexed, self.lengths = indexed, lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self.indexed.get(int(index), 0, int(self.lengths[index])), dtype=np.int64)


def length_batches(lengths: np.ndarray, max_tokens_per_batch: int, equal_lengths: bool) -> list[np.ndarray]:
    """Indices of sequences of these `lengths` in batches of at most max_tokens_per_batch tokens counted at the
    batch's longest sequence (always at least one), longest first, ties in index order. equal_lengths: one length
    per batch (no padding: the learning-dynamics rows need each sequence's own last position); otherwise
    neighbours in length order share a batch, so padding is bounded by their length difference."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        end = min(len(order), start + max(1, max_tokens_per_batch // max(longest, 1)))
        if equal_lengths:
            end = start + int(np.count_nonzero(lengths[order[start:end]] == longest))
        batches.append(order[start:end])
        start = end
    return batches
