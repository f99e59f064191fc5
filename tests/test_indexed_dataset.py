"""The .bin/.idx layout byte for byte, round trips, merging, validation and atomic output."""

import struct

import numpy as np
import pytest

from megapico.data.indexed_dataset import (
    DataError,
    IndexedDataset,
    IndexedDatasetWriter,
    merge_datasets,
    token_dtype,
)


def test_idx_bytes_for_a_hand_computed_case(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
        writer.add_document(np.array([1, 2, 3]))
        writer.add_documents(np.array([4, 5, 6]), np.array([2, 1]))
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", 3, 4)
                + struct.pack("<3i", 3, 2, 1) + struct.pack("<3q", 0, 6, 10) + struct.pack("<4q", 0, 1, 2, 3))
    assert (tmp_path / "d.idx").read_bytes() == expected
    assert (tmp_path / "d.bin").read_bytes() == np.array([1, 2, 3, 4, 5, 6], np.uint16).tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]  # no temporaries left


def test_round_trip_dtype_and_merge(tmp_path):
    assert token_dtype(50304) == np.uint16 and token_dtype(65500) == np.int32 and token_dtype(100_000) == np.int32
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100_000, size=n) for n in (5, 1, 17, 3)]
    for name, part in (("a", docs[:2]), ("b", docs[2:])):
        with IndexedDatasetWriter(tmp_path / name, token_dtype(100_000)) as writer:
            for doc in part:
                writer.add_document(doc)
    merged = merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert merged.dtype == np.int32 and len(merged) == 4 and merged.num_tokens == 26
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(merged[i], doc)
    np.testing.assert_array_equal(merged.get(2, offset=3, length=4), docs[2][3:7])
    np.testing.assert_array_equal(merged.document_indices, [0, 1, 2, 3, 4])


@pytest.fixture
def small_pair(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as writer:
        writer.add_document(np.arange(10))
        writer.add_document(np.arange(7))
    return tmp_path / "d"


def test_truncated_bin(small_pair):
    data = small_pair.with_suffix(".bin").read_bytes()
    small_pair.with_suffix(".bin").write_bytes(data[:-4])
    with pytest.raises(DataError, match=r"d\.bin: 30 bytes but its index describes 34 \(truncated"):
        IndexedDataset(small_pair)


def test_truncated_idx(small_pair):
    data = small_pair.with_suffix(".idx").read_bytes()
    small_pair.with_suffix(".idx").write_bytes(data[:-8])
    with pytest.raises(DataError, match=r"d\.idx: .* \(truncated or corrupt"):
        IndexedDataset(small_pair)
    small_pair.with_suffix(".idx").write_bytes(data[:20])
    with pytest.raises(DataError, match="shorter than the header"):
        IndexedDataset(small_pair)


def test_foreign_files(small_pair):
    small_pair.with_suffix(".idx").write_bytes(b'{"not": "an index"}' + b"\x00" * 40)
    with pytest.raises(DataError, match="not a Megatron .idx file"):
        IndexedDataset(small_pair)
    data = bytearray(b"MMIDIDX\x00\x00" + struct.pack("<Q", 2) + b"\x08" + b"\x00" * 40)
    small_pair.with_suffix(".idx").write_bytes(bytes(data))
    with pytest.raises(DataError, match="unsupported index version 2"):
        IndexedDataset(small_pair)
    with pytest.raises(DataError, match=r"missing \(build it with tools/preprocess_data.py"):
        IndexedDataset(small_pair.parent / "nothing")


def test_an_interrupted_write_leaves_the_old_pair_intact(small_pair):
    before = {s: small_pair.with_suffix(s).read_bytes() for s in (".bin", ".idx")}
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(small_pair, np.uint16) as writer:
            writer.add_document(np.arange(1000))
            raise RuntimeError("killed")
    assert {s: small_pair.with_suffix(s).read_bytes() for s in (".bin", ".idx")} == before
    assert sorted(p.name for p in small_pair.parent.iterdir()) == ["d.bin", "d.idx"]


def test_merge_tool(tmp_path, capsys):
    from merge_datasets import main

    (tmp_path / "parts").mkdir()
    for name, docs in (("b", [[3, 4]]), ("a", [[1], [2, 2]])):
        with IndexedDatasetWriter(tmp_path / "parts" / name, np.uint16) as writer:
            for doc in docs:
                writer.add_document(np.array(doc))
    assert main(["--input", str(tmp_path / "parts"), "--output-prefix", str(tmp_path / "all")]) == 0
    assert [d.tolist() for d in IndexedDataset(tmp_path / "all")] == [[1], [2, 2], [3, 4]]
    assert main(["--input", str(tmp_path / "empty"), "--output-prefix", str(tmp_path / "x")]) == 1
    assert "no .idx files to merge" in capsys.readouterr().err
