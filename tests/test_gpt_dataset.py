"""Megatron's GPT sample scheme: split, epochs, sample index, shuffles, cache, blending, DP sampler."""

import numpy as np
import pytest
import torch
from distributed import run_distributed

from megapico.data.blended_dataset import build_blending_indices
from megapico.data.builders import build_dataset, parse_blend
from megapico.data.gpt_dataset import GPTDataset, build_sample_index, split_document_ranges
from megapico.data.indexed_dataset import DataError, IndexedDataset, IndexedDatasetWriter
from megapico.data.sampler import PretrainingSampler, collate_samples


def megatron_sample_index(sizes, document_index, seq_len):
    """A plain port of Megatron's C++ build_sample_idx loop (add_extra_token=1, drop the last partial)."""
    num_samples = (int(sizes[document_index].sum()) - 1) // seq_len
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    doc_pos, doc_offset = 0, 0
    for i in range(1, num_samples + 1):
        remaining = seq_len + 1
        while remaining != 0:
            length = int(sizes[document_index[doc_pos]]) - doc_offset
            remaining -= length
            if remaining <= 0:
                doc_offset += remaining + length - 1
                remaining = 0
            else:
                doc_pos, doc_offset = doc_pos + 1, 0
        out[i] = doc_pos, doc_offset
    return out


def test_sample_index_equals_megatron_loop():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, size=300).astype(np.int32)
    document_index = rng.permutation(np.tile(np.arange(300), 2)).astype(np.int32)
    for seq_len in (1, 7, 16, 64):
        np.testing.assert_array_equal(build_sample_index(sizes, document_index, seq_len),
                                      megatron_sample_index(sizes, document_index, seq_len))


def test_split_ranges_round_like_megatron():
    assert split_document_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges(10, "8,1,1") == [(0, 8), (8, 9), (9, 10)]
    assert split_document_ranges(7, "1") == [(0, 7), (7, 7), (7, 7)]
    with pytest.raises(DataError, match="not comma-separated numbers"):
        split_document_ranges(10, "a,b")


def test_every_sample_is_the_right_tokens_and_none_is_lost(sample_prefix, tmp_path):
    indexed = IndexedDataset(sample_prefix)
    seq_len = 64
    dataset = GPTDataset(indexed, "train", num_samples=100, seq_len=seq_len, seed=1234, split="90,10,0",
                         cache_dir=tmp_path)
    train_docs = split_document_ranges(len(indexed), "90,10,0")[0]
    assert set(np.unique(dataset.document_index)) == set(range(*train_docs))
    stream = np.concatenate([indexed[int(d)] for d in dataset.document_index])
    assert sorted(int(s) for s in dataset.shuffle_index) == list(range(len(dataset)))  # a permutation
    for index in range(len(dataset)):
        sample = int(dataset.shuffle_index[index])
        np.testing.assert_array_equal(dataset[index], stream[sample * seq_len: sample * seq_len + seq_len + 1])


def test_epochs_and_separate_final_epoch(sample_prefix, tmp_path):
    indexed = IndexedDataset(sample_prefix)
    begin, end = split_document_ranges(len(indexed), "969,30,1")[1]
    tokens = int(indexed.sequence_lengths[begin:end].sum())
    per_epoch = (tokens - 1) // 32
    dataset = GPTDataset(indexed, "valid", num_samples=per_epoch * 2 + 3, seq_len=32, seed=7, cache_dir=tmp_path)
    assert len(dataset.document_index) == 3 * (end - begin)  # 3 epochs, the last one only slightly used
    first_two = len(dataset) - (2 * per_epoch + 1)
    assert first_two > 0
    # the final, mostly unused epoch is shuffled on its own: its samples stay at the end of the order
    head = np.asarray(dataset.shuffle_index[: 2 * per_epoch])
    assert head.max() < 2 * per_epoch + 1


def test_cache_is_reused_and_keyed(sample_prefix, tmp_path):
    indexed = IndexedDataset(sample_prefix)
    first = GPTDataset(indexed, "train", 50, 32, 1, cache_dir=tmp_path)
    assert not first.cache_hit
    second = GPTDataset(indexed, "train", 50, 32, 1, cache_dir=tmp_path)
    assert second.cache_hit and second.build_seconds == 0.0
    np.testing.assert_array_equal(first.shuffle_index, second.shuffle_index)
    other_seed = GPTDataset(indexed, "train", 50, 32, 2, cache_dir=tmp_path)
    assert not other_seed.cache_hit
    assert not np.array_equal(other_seed.shuffle_index, first.shuffle_index)
    assert len(list(tmp_path.glob("*-description.json"))) == 2


def _build_on_every_rank(rank, world_size, prefix, cache_dir):
    dataset = GPTDataset(IndexedDataset(prefix), "train", 40, 16, 3, cache_dir=cache_dir)
    rows = [None] * world_size
    torch.distributed.all_gather_object(rows, (dataset.build_seconds > 0, np.asarray(dataset.shuffle_index).tolist()))
    return rows


def test_rank0_builds_and_the_others_map_the_cache(sample_prefix, tmp_path):
    rows = run_distributed(_build_on_every_rank, 2, sample_prefix, str(tmp_path / "cache"), tmp_path=tmp_path)
    assert [built for built, _ in rows] == [True, False]
    assert rows[0][1] == rows[1][1]


def test_blending_follows_the_weights_at_every_prefix():
    weights = np.array([0.3, 0.5, 0.2])
    dataset_index, sample_index = build_blending_indices(weights, 10_000)
    counts = np.zeros(3)
    for i, d in enumerate(dataset_index):
        assert sample_index[i] == counts[d]
        counts[d] += 1
        assert np.all(np.abs(counts - weights * (i + 1)) <= 1.0 + 1e-9)
    np.testing.assert_array_equal(np.bincount(dataset_index), [3000, 5000, 2000])


def test_blended_dataset_draws_from_each_prefix_in_proportion(tmp_path):
    prefixes = []
    for name, token in (("a", 1), ("b", 2)):
        with IndexedDatasetWriter(tmp_path / name, np.uint16) as writer:
            for _ in range(200):
                writer.add_document(np.full(9, token))
        prefixes.append(str(tmp_path / name))
    blend = build_dataset(["0.25", prefixes[0], "0.75", prefixes[1]], "train", 400, 8, 0, split="1",
                          cache_dir=str(tmp_path / "cache"))
    sources = [int(blend[i][0]) for i in range(len(blend))]
    assert len(sources) == 400 and sources.count(1) == 100 and sources.count(2) == 300
    assert parse_blend(["0.3 A 0.7 B"]) == [(0.3, "A"), (0.7, "B")]
    with pytest.raises(DataError, match="weight/prefix pairs"):
        parse_blend(["0.3", "A", "0.7"])


def test_global_order_is_independent_of_dp_and_resumes():
    one = [b for b in PretrainingSampler(64, 0, micro_batch_size=4, dp_rank=0, dp_size=1)]
    ranks = [list(PretrainingSampler(64, 0, micro_batch_size=2, dp_rank=r, dp_size=2)) for r in range(2)]
    # each DP=2 micro-step covers the same 4 samples as the DP=1 micro-step
    assert [sorted(ranks[0][i] + ranks[1][i]) for i in range(len(one))] == one
    resumed = list(PretrainingSampler(64, 24, micro_batch_size=4, dp_rank=0, dp_size=1))
    assert resumed == one[6:]
    inputs, labels = collate_samples([np.arange(5), np.arange(5, 10)])
    assert inputs.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and labels.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
