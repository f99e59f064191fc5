"""Preprocessing records the tokenizer (fingerprint, largest id) and the data's largest id beside each prefix;
check_tokenizer_for_data refuses, in one line, a tokenizer or data whose ids do not fit the model and a tokenizer
other than the one the data was built with."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TOKENIZER
from merge_datasets import main as merge_main
from preprocess_data import main as preprocess_main

from megapico.data.indexed_dataset import DataError, IndexedDataset
from megapico.data.provenance import check_tokenizer_for_data, read_record, record_path
from megapico.data.tokenizer import load_tokenizer

VOCAB = 50304  # pico's padded vocabulary


def _tokenizer_variant(tmp_path, name, change):
    """pico's tokenizer.json with `change(spec)` applied, written as `name`."""
    spec = json.loads(TOKENIZER.read_text())
    change(spec)
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return str(path)


def _move_id(spec, old_id, new_id):
    vocab = spec["model"]["vocab"]
    token = next(token for token, index in vocab.items() if index == old_id)
    vocab[token] = new_id


def _swap_ids(spec):
    vocab = spec["model"]["vocab"]
    a, b = (next(token for token, index in vocab.items() if index == i) for i in (5801, 627))
    vocab[a], vocab[b] = vocab[b], vocab[a]


def test_preprocess_records_the_tokenizer_and_the_largest_id(sample_prefix):
    record = read_record(sample_prefix)
    tokenizer = load_tokenizer(str(TOKENIZER))
    assert record["format"] == 1 and record["max_token_id"] == 50279  # the end-of-document token
    assert record["max_token_id"] == int(IndexedDataset(sample_prefix).token_stream().max())
    assert (record["documents"], record["tokens"]) == (len(IndexedDataset(sample_prefix)),
                                                       IndexedDataset(sample_prefix).num_tokens)
    assert record["tokenizer"] == {"path": str(TOKENIZER), "sha256": tokenizer.fingerprint(), "vocab_size": 50280,
                                   "max_id": 50279, "eod_id": 50279}
    check_tokenizer_for_data([sample_prefix, sample_prefix], str(TOKENIZER), VOCAB)  # fits, same tokenizer
    check_tokenizer_for_data([sample_prefix], None, VOCAB)


def test_fingerprint_is_the_vocabulary_not_the_file(tmp_path):
    """A re-serialised copy (as an export writes it: other formatting, merges as pairs) is the same tokenizer; one
    changed id is not."""
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(TOKENIZER)).save(str(tmp_path / "saved.json"), pretty=True)
    assert (tmp_path / "saved.json").read_bytes() != TOKENIZER.read_bytes()
    fingerprint = load_tokenizer(str(TOKENIZER)).fingerprint()
    assert load_tokenizer(str(tmp_path / "saved.json")).fingerprint() == fingerprint
    assert load_tokenizer(_tokenizer_variant(tmp_path, "swapped.json", _swap_ids)).fingerprint() != fingerprint


def test_tokenizer_ids_beyond_the_model(tmp_path, sample_prefix):
    """50,280 entries, but one id is 60025: counting entries passes it, its largest id does not."""
    sparse = _tokenizer_variant(tmp_path, "sparse.json", lambda spec: _move_id(spec, 5801, 60025))
    assert load_tokenizer(sparse).vocab_size == 50280 and load_tokenizer(sparse).max_id == 60025
    with pytest.raises(DataError) as caught:
        check_tokenizer_for_data([sample_prefix], sparse, VOCAB)
    assert str(caught.value).startswith(f"{sparse}: its ids reach 60025, the model's vocab_size is 50304 (")
    assert "\n" not in str(caught.value)


def test_data_ids_beyond_the_model(sample_prefix):
    for tokenizer in (None, ""):
        with pytest.raises(DataError, match=rf"^{sample_prefix}: its token ids reach 50279 "
                                            rf"\({sample_prefix}.megapico.json\), the model's vocab_size is 50000; "
                                            rf"re-preprocess it with the model's tokenizer"):
            check_tokenizer_for_data([sample_prefix], tokenizer, 50000)


def test_another_tokenizer_than_the_data_was_built_with(tmp_path, sample_prefix):
    """Same size, ids in range, two tokens swapped: only the fingerprint tells it apart; the line names both files."""
    other = _tokenizer_variant(tmp_path, "other.json", _swap_ids)
    with pytest.raises(DataError) as caught:
        check_tokenizer_for_data([sample_prefix], other, VOCAB)
    assert str(caught.value) == (f"{other} is not the tokenizer {sample_prefix} was built with ({TOKENIZER}, per "
                                 f"{sample_prefix}.megapico.json): pass that tokenizer (data.tokenizer), or "
                                 f"re-preprocess the data with {other}")


def test_data_without_a_record_skips_its_checks(tmp_path, sample_prefix):
    """Megatron's (or an older megapico's) data has no record: nothing to compare, no error; the tokenizer's own
    ids are still checked."""
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{sample_prefix}{suffix}", tmp_path / f"megatron_text_document{suffix}")
    prefix = str(tmp_path / "megatron_text_document")
    check_tokenizer_for_data([prefix], _tokenizer_variant(tmp_path, "other.json", _swap_ids), VOCAB)
    check_tokenizer_for_data([prefix], None, 1000)
    sparse = _tokenizer_variant(tmp_path, "sparse.json", lambda spec: _move_id(spec, 5801, 60025))
    with pytest.raises(DataError, match="its ids reach 60025"):
        check_tokenizer_for_data([prefix], sparse, VOCAB)


def test_unreadable_record_is_one_line(tmp_path, sample_prefix):
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{sample_prefix}{suffix}", tmp_path / f"data{suffix}")
    record_path(tmp_path / "data").write_text("{not json")
    with pytest.raises(DataError, match=r"data.megapico.json: unreadable data record \(JSONDecodeError\); "
                                        r"re-preprocess the data, or delete the file"):
        check_tokenizer_for_data([str(tmp_path / "data")], str(TOKENIZER), VOCAB)
    record_path(tmp_path / "data").write_text('{"format": 7}')
    with pytest.raises(DataError, match="data.megapico.json: not a megapico data record of format 1"):
        check_tokenizer_for_data([str(tmp_path / "data")], None, VOCAB)


def test_pretokenized_input_records_its_largest_id_without_a_tokenizer(tmp_path):
    pq.write_table(pa.table({"input_ids": [[1, 2], [3, 40000, 4], [5]]}), tmp_path / "ids.parquet")
    assert preprocess_main(["--input", str(tmp_path / "ids.parquet"), "--output-prefix", str(tmp_path / "ids"),
                            "--json-keys", "input_ids", "--vocab-size", str(VOCAB)]) == 0
    prefix = str(tmp_path / "ids_input_ids_document")
    record = read_record(prefix)
    assert (record["tokenizer"], record["max_token_id"], record["documents"], record["tokens"]) == (None, 40000, 3, 6)
    check_tokenizer_for_data([prefix], str(TOKENIZER), VOCAB)  # no fingerprint to compare: the ids fit
    with pytest.raises(DataError, match="ids_input_ids_document: its token ids reach 40000"):
        check_tokenizer_for_data([prefix], None, 32000)


def test_rebuilding_a_prefix_replaces_its_record(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "hello world"}\n')
    args = ["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out")]
    other = _tokenizer_variant(tmp_path, "other.json", _swap_ids)
    assert preprocess_main([*args, "--tokenizer-model", str(TOKENIZER)]) == 0
    assert preprocess_main([*args, "--tokenizer-model", other]) == 0
    prefix = str(tmp_path / "out_text_document")
    assert read_record(prefix)["tokenizer"]["path"] == other
    check_tokenizer_for_data([prefix], other, VOCAB)
    with pytest.raises(DataError, match="is not the tokenizer"):
        check_tokenizer_for_data([prefix], str(TOKENIZER), VOCAB)


def test_merge_keeps_the_record_and_refuses_two_tokenizers(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "goodbye"}\n{"text": "again"}\n')
    (tmp_path / "parts").mkdir()
    for name in ("a", "b"):
        assert preprocess_main(["--input", str(tmp_path / f"{name}.jsonl"), "--output-prefix",
                                str(tmp_path / "parts" / name), "--tokenizer-model", str(TOKENIZER),
                                "--append-eod"]) == 0
    assert merge_main(["--input", str(tmp_path / "parts"), "--output-prefix", str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out.strip().endswith("merged.bin / .idx / .megapico.json")
    record = read_record(tmp_path / "merged")
    assert (record["documents"], record["max_token_id"]) == (3, 50279)
    assert record["tokenizer"] == read_record(tmp_path / "parts" / "a_text_document")["tokenizer"]
    other = _tokenizer_variant(tmp_path, "other.json", _swap_ids)
    assert preprocess_main(["--input", str(tmp_path / "b.jsonl"), "--output-prefix", str(tmp_path / "parts" / "b"),
                            "--tokenizer-model", other]) == 0
    assert merge_main(["--input", str(tmp_path / "parts"), "--output-prefix", str(tmp_path / "mixed")]) == 1
    assert "were built with different tokenizers" in capsys.readouterr().err
    assert not list(tmp_path.glob("mixed*"))


def test_a_record_that_is_not_its_datas_is_refused(tmp_path, sample_prefix):
    """A received record is checked against the .idx it sits beside: counts of other data (or fields of the wrong
    type) are one line, not believed. (Its max_token_id cannot be checked without reading the whole .bin: the
    datasets check each sample's ids as read, tests/test_hostile_inputs.py.)"""
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{sample_prefix}{suffix}", tmp_path / f"data{suffix}")
    prefix = str(tmp_path / "data")
    honest = read_record(sample_prefix)
    dataset = IndexedDataset(prefix)
    record_path(prefix).write_text(json.dumps({**honest, "documents": 3, "max_token_id": 100}))
    with pytest.raises(DataError) as caught:
        check_tokenizer_for_data([prefix], None, 1000)
    assert str(caught.value) == (f"{record_path(prefix)}: records 3 documents / {honest['tokens']:,} tokens, but "
                                 f"{prefix}.idx holds {len(dataset):,} / {dataset.num_tokens:,}: the record is not "
                                 f"this data's; re-preprocess the data, or delete the file to skip the tokenizer "
                                 f"checks")
    for wrong in ({"tokens": "240747"}, {"tokenizer": "anything"}, {"documents": True}):
        record_path(prefix).write_text(json.dumps({**honest, **wrong}))
        with pytest.raises(DataError, match="not a megapico data record of format 1"):
            check_tokenizer_for_data([prefix], None, VOCAB)
    record_path(prefix).write_text(json.dumps(honest))
    check_tokenizer_for_data([prefix], str(TOKENIZER), VOCAB)  # its own record, copied along: fine
