"""Megatron's GPT sample scheme over an IndexedDataset: split, epochs, document / sample / shuffle indices.

- split "969,30,1" -> contiguous document ranges (Megatron's rounding, last range absorbs the remainder).
- epochs: the fewest E with E * tokens >= num_samples * seq_len + 1; the document order is the split's
  documents tiled E times and shuffled (a last epoch under 80% full is shuffled on its own).
- sample index [S + 1, 2] of (position in document order, token offset): sample i is the seq_len + 1 tokens
  starting at global token i * seq_len of the shuffled stream, so samples overlap by one token. Built with
  one searchsorted over the document ends (vectorised; Megatron loops in C++), same numbers.
- shuffle index: a seeded permutation of the samples (the final separate epoch permuted on its own).
The three arrays are cached as .npy named by a hash of everything that determines them; rank 0 builds (each
node's local rank 0 where a node cannot see rank 0's files), the other ranks memory-map (index_cache.py).
"""

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from megapico.data.index_cache import cache_directory, load_or_build, write_text
from megapico.data.indexed_dataset import DataError, IndexedDataset, check_vocabulary

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    try:
        weights = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        raise DataError(f"split '{split}' is not comma-separated numbers like 969,30,1") from None
    if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"split '{split}' must be up to three non-negative numbers with a positive sum")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """[(begin, end)] document ranges for train/valid/test, exactly as Megatron rounds them."""
    bounds = [0]
    for weight in parse_split(split):
        bounds.append(bounds[-1] + int(round(weight * float(num_documents))))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def _document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                    separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        index = np.tile(documents, num_epochs).astype(np.int32)
        rng.shuffle(index)
        return index
    first = _document_index(documents, num_epochs - 1, rng, False)
    last = _document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, document_index: np.ndarray, seq_len: int) -> np.ndarray:
    """[(position in document_index, offset)] for every full sample of seq_len + 1 tokens, plus the end."""
    doc_lengths = sizes[document_index].astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(doc_lengths)[:-1]))
    num_samples = (int(doc_lengths.sum()) - 1) // seq_len
    first_tokens = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    positions = np.searchsorted(starts, first_tokens, side="right") - 1
    dtype = np.int32 if len(document_index) < 2**31 and doc_lengths.max(initial=0) < 2**31 else np.int64
    return np.stack((positions, first_tokens - starts[positions]), axis=1).astype(dtype)


def _shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


class GPTDataset:
    """Samples of seq_len + 1 tokens (inputs + shifted targets) from one split of one prefix."""

    def __init__(self, indexed: IndexedDataset, split_name: str, num_samples: int, seq_len: int, seed: int,
                 split: str = "969,30,1", cache_dir: str | Path | None = None, vocab_size: int | None = None) -> None:
        self.indexed, self.seq_len, self.vocab_size = indexed, seq_len, vocab_size
        begin, end = split_document_ranges(len(indexed), split)[SPLIT_NAMES.index(split_name)]
        if end <= begin:
            raise DataError(f"{indexed.prefix}: split '{split}' leaves no documents for '{split_name}'")
        self.documents = np.arange(begin, end, dtype=np.int32)
        tokens_per_epoch = int(indexed.sequence_lengths[begin:end].sum(dtype=np.int64))
        if tokens_per_epoch <= seq_len:
            raise DataError(f"{indexed.prefix}: the '{split_name}' split has {tokens_per_epoch} tokens, fewer than "
                            f"one sample of {seq_len + 1}")
        description = dict(cls="GPTDataset", prefix=str(Path(indexed.prefix).resolve()),
                           idx_bytes=indexed.idx_path.stat().st_size, idx_mtime=indexed.idx_path.stat().st_mtime_ns,
                           split=split, split_name=split_name, num_samples=num_samples, seq_len=seq_len, seed=seed)
        digest = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()
        self.description_digest = digest
        cache = cache_directory(cache_dir, indexed.prefix)
        paths = {name: cache / f"{digest}-{name}.npy" for name in ("document_index", "sample_index", "shuffle_index")}
        self.cache_hit = all(p.is_file() for p in paths.values())
        started = time.perf_counter()

        def build() -> dict[str, np.ndarray]:
            write_text(cache / f"{digest}-description.json", json.dumps(description, indent=2))
            return self._build(tokens_per_epoch, num_samples, seed)

        arrays, built = load_or_build(paths, build)
        self.build_seconds = time.perf_counter() - started if built else 0.0
        self.document_index, self.sample_index, self.shuffle_index = (
            arrays[name] for name in ("document_index", "sample_index", "shuffle_index"))
        if not built:  # a cache found on disk (received with the data, or another run's) is checked, not believed
            self._check_cache(paths)

    def _check_cache(self, paths: dict[str, Path]) -> None:
        """Every index of a cached sample index points inside what it indexes: the documents, the document order,
        the samples (one vectorised pass each); else one line naming the file."""
        documents, samples = len(self.indexed), self.sample_index
        checks = (
            ("document_index", self.document_index.ndim == 1 and len(self.document_index) > 0
             and 0 <= self.document_index.min() and self.document_index.max() < documents),
            ("sample_index", samples.ndim == 2 and samples.shape[1] == 2 and len(samples) >= 2
             and samples.min() >= 0 and samples[:, 0].max() < len(self.document_index)),
            ("shuffle_index", self.shuffle_index.ndim == 1
             and (len(self.shuffle_index) == 0 or (0 <= self.shuffle_index.min()
                                                   and self.shuffle_index.max() < len(samples) - 1))),
        )
        for name, fits in checks:
            if not fits:
                raise DataError(f"{paths[name]}: a cached {name} that points outside what it indexes (not built from "
                                f"this data); remove it, and it is rebuilt")

    def _build(self, tokens_per_epoch: int, num_samples: int, seed: int) -> dict[str, np.ndarray]:
        num_epochs = max(1, -(-(num_samples * self.seq_len + 1) // tokens_per_epoch))
        separate_final_epoch = False
        if num_epochs > 1:
            sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // self.seq_len
            per_epoch = (tokens_per_epoch - 1) // self.seq_len
            separate_final_epoch = (num_samples - sans_final) < int(0.80 * per_epoch)
        rng = np.random.RandomState(seed)
        document_index = _document_index(self.documents, num_epochs, rng, separate_final_epoch)
        sample_index = build_sample_index(self.indexed.sequence_lengths, document_index, self.seq_len)
        total = len(sample_index) - 1
        first_part = ((num_epochs - 1) * tokens_per_epoch - 1) // self.seq_len if separate_final_epoch else total
        return dict(document_index=document_index, sample_index=sample_index,
                    shuffle_index=_shuffle_index(first_part, total, rng))

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def spans(self, index: int) -> list[tuple[int, int, int]]:
        """(document, first token, tokens) of each document sample `index` is cut from, in order: what __getitem__
        reads, and what tools/trace_data.py names."""
        sample = int(self.shuffle_index[index])
        (first_pos, first_offset), (last_pos, last_offset) = self.sample_index[sample], self.sample_index[sample + 1]
        spans = []
        for position in range(int(first_pos), int(last_pos) + 1):
            document = int(self.document_index[position])
            start = int(first_offset) if position == first_pos else 0
            end = int(last_offset) + 1 if position == last_pos else int(self.indexed.sequence_lengths[document])
            spans.append((document, start, end - start))
        return spans

    def __getitem__(self, index: int) -> np.ndarray:
        """The sample's seq_len + 1 token ids, each checked to fit vocab_size where given (check_vocabulary)."""
        pieces = [(document, self.indexed.get(document, start, length))
                  for document, start, length in self.spans(index)]
        tokens = np.concatenate([piece for _, piece in pieces], dtype=np.int64)
        if self.vocab_size is not None and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            for document, piece in pieces:  # name the document
                check_vocabulary(piece.astype(np.int64), self.vocab_size, self.indexed.prefix, document)
        return tokens
