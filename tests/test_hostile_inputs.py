"""Data that came from someone else stays data: a sample-index cache that is a link is never followed, a saved HF
dataset or hub cache folder cannot name files outside itself, a data record that lies about its ids cannot carry
them past the model's vocabulary, and one endless JSON line costs neither unbounded memory nor quadratic time."""

import json
import shutil
import time

import numpy as np
import pytest
import zstandard
from conftest import TOKENIZER
from preprocess_data import main as preprocess_main

from megapico.config import DataConfig
from megapico.data import readers
from megapico.data.builders import build_train_dataset
from megapico.data.gpt_dataset import GPTDataset
from megapico.data.indexed_dataset import DataError, IndexedDataset, IndexedDatasetWriter
from megapico.data.provenance import check_tokenizer_for_data, data_record, write_record
from megapico.data.readers import discover_sources, read_chunks

VOCAB = 50304  # pico's padded vocabulary


def _prefix(directory, documents, dtype=np.uint16):
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "data_text_document"
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for ids in documents:
            writer.add_document(np.asarray(ids, dtype=dtype))
    return prefix


def _preprocess(tmp_path, input_path, *extra):
    return preprocess_main(["--input", str(input_path), "--output-prefix", str(tmp_path / "out"), "--tokenizer-model",
                            str(TOKENIZER), "--append-eod", *extra])


# ---- a record that lies about the ids ----------------------------------------------------------------------------
def test_ids_past_the_vocabulary_stop_at_use_whatever_the_record_says(tmp_path):
    """A received prefix whose .megapico.json claims max_token_id 100 (its counts right), while document 3 holds
    65000: the start-up check believes the record; reading the sample is one line naming the prefix and document."""
    documents = [[i % 100 + 1] * 40 for i in range(8)]
    documents[3][7] = 65000
    prefix = _prefix(tmp_path / "received", documents)
    record = data_record(prefix, None, 100)
    write_record(prefix, record)
    check_tokenizer_for_data([str(prefix)], None, VOCAB)  # the record's word: passes
    for dataset in (GPTDataset(IndexedDataset(prefix), "train", 8, 16, 1, "1,0,0", tmp_path / "cache", VOCAB),
                    build_train_dataset(DataConfig(train_data_path=[str(prefix)], split="1,0,0", seq_len=16,
                                                   cache_dir=str(tmp_path / "cache")), 8, VOCAB)):
        with pytest.raises(DataError) as caught:
            for index in range(len(dataset)):
                dataset[index]
        assert str(caught.value) == (f"{prefix}: document 3 holds token id 65000, outside the model's vocab_size "
                                     f"{VOCAB} (whatever its .megapico.json record says); re-preprocess the data "
                                     f"with the model's tokenizer")
    fitting = GPTDataset(IndexedDataset(prefix), "train", 8, 16, 1, "1,0,0", tmp_path / "cache", 65001)
    assert max(int(fitting[i].max()) for i in range(len(fitting))) == 65000  # ids that fit pass unchanged
    rows = build_train_dataset(DataConfig(train_data_path=[str(prefix)], samples="pretokenized", seq_len=39), 8, VOCAB)
    rows[2]  # pico's row order: document i is sample i
    with pytest.raises(DataError, match=r"document 3 holds token id 65000, outside the model's vocab_size 50304"):
        rows[3]


# ---- the sample-index cache beside received data -----------------------------------------------------------------
def test_a_linked_cache_directory_is_refused(tmp_path):
    prefix = _prefix(tmp_path / "received", [[1, 2, 3, 4] * 10] * 6)
    outside = tmp_path / "outside"
    outside.mkdir()
    (prefix.parent / "index-cache").symlink_to(outside)
    with pytest.raises(DataError) as caught:
        GPTDataset(IndexedDataset(prefix), "train", 8, 16, 1, "1,0,0")
    assert str(caught.value) == (f"{prefix.parent / 'index-cache'}: a symbolic link (to {outside}) in the sample-index "
                                 f"cache; refusing to read or write through it (remove it; data.cache_dir names a "
                                 f"plain directory)")
    assert list(outside.iterdir()) == []  # nothing written through it


def test_a_linked_cache_file_is_neither_read_nor_written_through(tmp_path):
    prefix = _prefix(tmp_path / "received", [[1, 2, 3, 4] * 10] * 6)
    first = GPTDataset(IndexedDataset(prefix), "train", 8, 16, 1, "1,0,0")  # builds index-cache/ beside the data
    cache = prefix.parent / "index-cache"
    planted = next(cache.glob("*-shuffle_index.npy"))
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros(3, dtype=np.int64))
    before = outside.read_bytes()
    planted.unlink()
    planted.symlink_to(outside)
    with pytest.raises(DataError, match=rf"^{planted}: a symbolic link \(to {outside}\) in the sample-index cache"):
        GPTDataset(IndexedDataset(prefix), "train", 8, 16, 1, "1,0,0")
    assert outside.read_bytes() == before
    assert len(first) >= 8 and not [p for p in cache.iterdir() if ".tmp-" in p.name]


# ---- saved HF datasets and hub cache folders name only their own files ------------------------------------------
def _saved_dataset(path, texts):
    import datasets

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(path))
    return path


def test_a_saved_dataset_naming_files_outside_it_is_refused(tmp_path, capsys):
    """state.json's _data_files joined to the folder: '../other/...' would feed another dataset (or any Arrow file)
    into the output."""
    other = _saved_dataset(tmp_path / "other", ["the secret text of someone else"])
    given = _saved_dataset(tmp_path / "given", ["a document"])
    state = json.loads((given / "state.json").read_text())
    escape = f"../other/{json.loads((other / 'state.json').read_text())['_data_files'][0]['filename']}"
    state["_data_files"] = [{"filename": escape}]
    (given / "state.json").write_text(json.dumps(state))
    assert _preprocess(tmp_path, given) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {given / 'state.json'}: names '{escape}', which is outside the dataset's folder {given}; "
                   f"refusing to read it")
    assert not list(tmp_path.glob("out*"))


def test_a_saved_dataset_dict_whose_split_climbs_out_is_refused(tmp_path, capsys):
    _saved_dataset(tmp_path / "elsewhere", ["someone else's text"])
    given = tmp_path / "given"
    given.mkdir()
    (given / "dataset_dict.json").write_text(json.dumps({"splits": ["../elsewhere"]}))
    assert _preprocess(tmp_path, given, "--hf-split", "../elsewhere") == 1
    assert f"{given / 'dataset_dict.json'}: names '../elsewhere', which is outside" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))


def test_a_hub_cache_folder_whose_ref_climbs_out_is_refused(tmp_path):
    repo = tmp_path / "datasets--org--name"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "private.jsonl").write_text('{"text": "not part of the dataset"}\n')
    (repo / "refs" / "main").write_text("../../outside")
    with pytest.raises(DataError, match=r"refs/main: names revision '../../outside', which is not a snapshot's name"):
        discover_sources(str(repo))
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "train.jsonl").write_text('{"text": "fine"}\n')
    assert discover_sources(str(repo)) == [str(repo / "snapshots" / "abc123" / "train.jsonl")]


# ---- one endless line ---------------------------------------------------------------------------------------------
def test_a_line_over_the_cap_is_one_line_naming_file_line_and_flag(tmp_path, capsys):
    lines = [json.dumps({"text": "first"}), json.dumps({"text": "many words " * 10_000}), json.dumps({"text": "third"})]
    given = tmp_path / "in.jsonl.zst"
    given.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    assert _preprocess(tmp_path, given, "--max-document-bytes", "10000") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {given}:2: a line longer than 10,000 bytes (raise --max-document-bytes to read it)")
    assert not list(tmp_path.glob("out_text_document.*"))  # no final output
    assert _preprocess(tmp_path, given, "--max-document-bytes", "10000", "--skip-bad-records") == 0
    assert "skipped: a line longer than 10,000 bytes (raise --max-document-bytes to read it): 1" in \
        capsys.readouterr().out
    assert len(IndexedDataset(tmp_path / "out_text_document")) == 2  # first, third


def test_a_long_line_is_never_held_past_the_cap(tmp_path, monkeypatch):
    """Read in 1 KB blocks, a 1 MB line under a 10 KB cap: no chunk holds more than the cap and one block, the long
    line is a `dropped` chunk at its line number, and the lines after it keep theirs."""
    monkeypatch.setattr(readers, "CHUNK_BYTES", 1024)
    given = tmp_path / "in.jsonl"
    given.write_bytes(b'{"text": "a"}\n{"text": "' + b"y" * (1 << 20) + b'"}\n{"text": "b"}\n{"text": "c"}')
    chunks = list(read_chunks(str(given), ["text"], max_line_bytes=10_000))
    assert max(len(chunk.lines) for chunk in chunks) <= 10_000 + 1024
    assert [(chunk.first_row, chunk.dropped) for chunk in chunks if chunk.dropped] == [
        (2, "a line longer than 10,000 bytes (raise --max-document-bytes to read it)")]
    kept = [(chunk.first_row, chunk.lines) for chunk in chunks if chunk.lines]
    assert kept == [(1, b'{"text": "a"}\n'), (3, b'{"text": "b"}\n'), (4, b'{"text": "c"}\n')]  # given its newline


def test_a_long_line_is_read_in_linear_time(tmp_path, monkeypatch):
    """16 MB in one line, 1 KB blocks: joined once (re-concatenating per block copied ~130 GB)."""
    monkeypatch.setattr(readers, "CHUNK_BYTES", 1024)
    given = tmp_path / "in.jsonl"
    line = b'{"text": "' + b"z" * (16 << 20) + b'"}\n'
    given.write_bytes(line)
    started = time.perf_counter()
    chunks = list(read_chunks(str(given), ["text"]))
    assert time.perf_counter() - started < 10
    assert [chunk.lines for chunk in chunks] == [line]


def test_the_cap_must_be_positive(tmp_path, capsys):
    shutil.copy(TOKENIZER, tmp_path / "t.json")
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    assert _preprocess(tmp_path, tmp_path / "in.jsonl", "--max-document-bytes", "0") == 1
    assert capsys.readouterr().err == "error: --max-document-bytes must be positive, got 0\n"


def test_a_planted_sample_index_cache_is_checked_not_believed(tmp_path):
    """A sample-index cache that came with received data (or any cache on disk) is not trusted: indices past what
    they index, a float array, or a pickled object array are one line naming the file, never an IndexError later
    or a pickle run."""
    prefix = _prefix(tmp_path / "received", [[i % 100 + 1] * 40 for i in range(8)])
    cache = tmp_path / "cache"
    dataset = GPTDataset(IndexedDataset(prefix), "train", 8, 16, 1, "1,0,0", cache, VOCAB)
    shuffle = next(cache.glob("*-shuffle_index.npy"))
    for planted, reason in ((np.full(len(dataset), 10**6, dtype=np.int64), "points outside what it indexes"),
                            (np.zeros(len(dataset), dtype=np.float64), "holds float64 values, not indices"),
                            (np.array([{"x": 1}], dtype=object), "not a sample-index cache file")):
        np.save(shuffle, planted, allow_pickle=True)
        with pytest.raises(DataError, match=f"{shuffle}: .*{reason}"):
            GPTDataset(IndexedDataset(prefix), "train", 8, 16, 1, "1,0,0", cache, VOCAB)
