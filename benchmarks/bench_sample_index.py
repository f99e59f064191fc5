"""Seconds to build the GPT document / sample / shuffle indices for a 1-billion-token corpus.

Document lengths are drawn like Dolma's (lognormal, mean ~ 500 tokens); the corpus is indexed for one epoch
of seq_len 2048 samples, i.e. what pretrain.py builds at start-up, and the vectorised sample index is checked
against Megatron's sequential loop on a prefix.
    python benchmarks/bench_sample_index.py --tokens 1e9
"""

import argparse
import time

import numpy as np

from megapico.data.blended_dataset import build_blending_indices
from megapico.data.gpt_dataset import _document_index, _shuffle_index, build_sample_index


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(mean=5.7, sigma=1.0, size=int(args.tokens / 490)), 1, 100_000).astype(np.int32)
    print(f"{len(sizes):,} documents, {int(sizes.sum(dtype=np.int64)):,} tokens, seq_len {args.seq_len}")
    start = time.perf_counter()
    document_index = _document_index(np.arange(len(sizes), dtype=np.int32), 1, np.random.RandomState(1234), False)
    t_doc = time.perf_counter()
    sample_index = build_sample_index(sizes, document_index, args.seq_len)
    t_sample = time.perf_counter()
    _shuffle_index(len(sample_index) - 1, len(sample_index) - 1, np.random.RandomState(1234))
    t_shuffle = time.perf_counter()
    print(f"document index {t_doc - start:.2f}s | sample index {t_sample - t_doc:.2f}s "
          f"({len(sample_index) - 1:,} samples) | shuffle index {t_shuffle - t_sample:.2f}s | "
          f"total {t_shuffle - start:.2f}s")
    samples = 200_000 * 1024  # the 16 x A100 tiny run: 200k steps x 1024 sequences
    start = time.perf_counter()
    build_blending_indices(np.array([0.6, 0.3, 0.1]), samples)
    print(f"blending indices for {samples:,} samples (3 datasets): {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
