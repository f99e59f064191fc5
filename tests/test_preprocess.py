"""tools/preprocess_data.py on real Dolma documents and every supported input format and failure."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import SAMPLE_DOCUMENTS, TOKENIZER
from preprocess_data import main as preprocess_main
from tokenizers import Tokenizer

from megapico.data.indexed_dataset import IndexedDataset
from megapico.data.preprocess import PreprocessOptions, preprocess

EOD = 50279


@pytest.fixture(scope="module")
def documents():
    texts = []
    for path in sorted(SAMPLE_DOCUMENTS.glob("*.json.gz")):
        with gzip.open(path, "rt") as handle:
            texts += [json.loads(line)["text"] for line in handle]
    return texts


@pytest.fixture(scope="module")
def reference_ids(documents):
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    return [tokenizer.encode(text).ids + [EOD] for text in documents]


def _assert_documents(prefix, expected):
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.uint16
    assert len(dataset) == len(expected)
    for i, ids in enumerate(expected):
        assert dataset[i].tolist() == ids, f"document {i}"


def _run(tmp_path, input_path, *extra, name="out"):
    argv = ["--input", str(input_path), "--output-prefix", str(tmp_path / name), "--tokenizer-model", str(TOKENIZER),
            "--tokenizer-type", "HuggingFaceTokenizer", "--append-eod", *extra]
    return preprocess_main(argv)


def test_dolma_directory_matches_the_tokenizer_in_order(sample_prefix, reference_ids):
    _assert_documents(sample_prefix, reference_ids)


def test_huggingface_backend_writes_the_same_files(tmp_path, capsys, sample_prefix):
    """The sample prefix was encoded by the default backend, tiktoken; HF's own encoder must agree byte for byte."""
    assert _run(tmp_path, SAMPLE_DOCUMENTS, "--tokenizer-backend", "huggingface") == 0
    assert "encoder huggingface; asked for" in capsys.readouterr().out
    for suffix in (".bin", ".idx"):
        with open(f"{sample_prefix}{suffix}", "rb") as expected:
            assert (tmp_path / f"out_text_document{suffix}").read_bytes() == expected.read()


def test_two_workers_give_identical_files(tmp_path, sample_prefix):
    assert _run(tmp_path, SAMPLE_DOCUMENTS, "--workers", "2", "--log-interval", "100") == 0
    for suffix in (".bin", ".idx"):
        with open(f"{sample_prefix}{suffix}", "rb") as expected:
            assert (tmp_path / f"out_text_document{suffix}").read_bytes() == expected.read()


def test_plain_jsonl_zst_and_glob(tmp_path, documents, reference_ids):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(documents[:300])]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:100]) + "\n")
    compressed = zstandard.ZstdCompressor().compress(("\n".join(lines[100:]) + "\n").encode())
    (tmp_path / "b.jsonl.zst").write_bytes(compressed)
    assert _run(tmp_path, tmp_path / "a.jsonl", name="jsonl") == 0
    _assert_documents(tmp_path / "jsonl_text_document", reference_ids[:100])
    assert _run(tmp_path, tmp_path / "b.jsonl.zst", name="zst") == 0
    _assert_documents(tmp_path / "zst_text_document", reference_ids[100:300])
    assert _run(tmp_path, str(tmp_path / "*.jsonl*"), name="glob") == 0
    _assert_documents(tmp_path / "glob_text_document", reference_ids[:300])


def test_parquet_text_and_pretokenized_input_ids(tmp_path, documents, reference_ids):
    pq.write_table(pa.table({"text": documents[:200]}), tmp_path / "text.parquet")
    assert _run(tmp_path, tmp_path / "text.parquet", name="pqtext") == 0
    _assert_documents(tmp_path / "pqtext_text_document", reference_ids[:200])
    pretokenized = [ids[:-1] for ids in reference_ids[:150]]
    pq.write_table(pa.table({"input_ids": pa.array(pretokenized, type=pa.list_(pa.int32()))}),
                   tmp_path / "ids.parquet")
    assert _run(tmp_path, tmp_path / "ids.parquet", "--json-keys", "input_ids", name="pqids") == 0
    _assert_documents(tmp_path / "pqids_input_ids_document", reference_ids[:150])


def test_saved_hf_dataset(tmp_path, documents, reference_ids):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": documents[:120]})}).save_to_disk(
        str(tmp_path / "hf"))
    assert _run(tmp_path, tmp_path / "hf", "--hf-split", "train", name="hf") == 0
    _assert_documents(tmp_path / "hf_text_document", reference_ids[:120])


def test_sentencepiece_tokenizer(tmp_path, documents):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(documents[:400]))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                             character_coverage=1.0, minloglevel=2)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents[:50]) + "\n")
    code = preprocess_main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "sp_out"),
                            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                            str(tmp_path / "sp.model"), "--append-eod"])
    assert code == 0
    expected = [processor.encode(t) + [processor.eos_id()] for t in documents[:50]]
    _assert_documents(tmp_path / "sp_out_text_document", expected)


BAD_RECORDS = [
    (b'{"text": "fine"}\n{"text": "broken\n', "in.jsonl:2: malformed JSON"),
    (b'{"text": "fine"}\n{"body": "no text key"}\n', "in.jsonl:2: no key 'text'"),
    (b'{"text": "fine"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n', "in.jsonl:3: non-UTF-8 bytes"),
    (b'{"text": 7}\n', "in.jsonl:1: value is not a string"),
    (b'{"text": "pair \\ud83d\\ude00 ok"}\n{"text": "lone \\udc00 half"}\n', "in.jsonl:2: a \\u escape of a lone"),
]


@pytest.mark.parametrize("content, message", BAD_RECORDS)
def test_bad_record_stops_with_file_and_line(tmp_path, capsys, content, message):
    (tmp_path / "in.jsonl").write_bytes(content)
    assert _run(tmp_path, tmp_path / "in.jsonl") == 1
    err = capsys.readouterr().err
    assert message in err and "--skip-bad-records" in err
    assert not list(tmp_path.glob("out_text_document.*"))  # no final output


def test_skip_bad_records_counts_by_reason(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(b"".join(content for content, _ in BAD_RECORDS) + b'{"text": ""}\n\n')
    assert _run(tmp_path, tmp_path / "in.jsonl", "--skip-bad-records") == 0
    out = capsys.readouterr().out
    for reason in ("malformed JSON: 1", "no key 'text': 1", "non-UTF-8 bytes: 1", "value is not a string: 1",
                   "lone UTF-16 surrogate (not text): 1", "empty document (text): 1"):
        assert reason in out
    assert len(IndexedDataset(tmp_path / "out_text_document")) == 5  # fine, fine, ok, fine, pair


def test_pretokenized_id_outside_vocab(tmp_path, capsys):
    pq.write_table(pa.table({"input_ids": [[1, 2], [3, 60000, 4], [5]]}), tmp_path / "ids.parquet")
    assert _run(tmp_path, tmp_path / "ids.parquet", "--json-keys", "input_ids") == 1
    assert "ids.parquet:2: token id 60000 in column 'input_ids' is outside the vocabulary [0, 50280)" in \
        capsys.readouterr().err
    assert _run(tmp_path, tmp_path / "ids.parquet", "--json-keys", "input_ids", "--skip-bad-records") == 0
    assert [d.tolist() for d in IndexedDataset(tmp_path / "out_input_ids_document")] == [[1, 2, EOD], [5, EOD]]


def test_unreadable_and_missing_inputs(tmp_path, capsys):
    (tmp_path / "bad.json.gz").write_bytes(b"this is not gzip")
    assert _run(tmp_path, tmp_path / "bad.json.gz") == 1
    assert "bad.json.gz: unreadable" in capsys.readouterr().err
    assert _run(tmp_path, tmp_path / "nothing-here") == 1
    assert "no input found" in capsys.readouterr().err
    (tmp_path / "ok.jsonl").write_text('{"text": "x"}\n')
    assert preprocess_main(["--input", str(tmp_path / "ok.jsonl"), "--output-prefix", str(tmp_path / "o"),
                            "--tokenizer-model", str(tmp_path / "missing.json")]) == 1
    assert "missing.json: no HF tokenizer here" in capsys.readouterr().err


def test_interrupted_run_leaves_nothing_final_and_resumes(tmp_path, documents, reference_ids):
    lines = [json.dumps({"text": t}) for t in documents[:60]]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(lines[30:]) + "\n{broken\n")
    options = PreprocessOptions(input=str(tmp_path / "in"), output_prefix=str(tmp_path / "out"),
                                tokenizer_model=str(TOKENIZER), append_eod=True)
    with pytest.raises(Exception, match="b.jsonl:31: malformed JSON"):
        preprocess(options)
    assert not list(tmp_path.glob("out_text_document.*"))
    assert len(list((tmp_path / "out.parts").glob("*.idx"))) == 1  # a.jsonl finished atomically
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(lines[30:]) + "\n")
    summary = preprocess(options)
    assert summary["resumed_files"] == 1 and summary["documents"] == 60
    _assert_documents(tmp_path / "out_text_document", reference_ids[:60])
    assert not (tmp_path / "out.parts").exists()


EMPTY_INPUTS = {
    "an empty file": ({"in.jsonl": b""}, "in.jsonl", "no documents (empty input)"),
    "a directory of empty files": ({"docs/a.jsonl": b"", "docs/b.json.gz": gzip.compress(b"")}, "docs",
                                   "no documents (empty input)"),
    "only blank lines": ({"in.jsonl": b"\n\n  \n"}, "in.jsonl", "no documents (empty input)"),
    "all-empty documents": ({"in.jsonl": b'{"text": ""}\n{"text": ""}\n'}, "in.jsonl",
                            "every document is empty or skipped (2 read; empty document (text): 2)"),
}


@pytest.mark.parametrize("case", list(EMPTY_INPUTS))
def test_empty_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    files, given, message = EMPTY_INPUTS[case]
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    assert _run(tmp_path, tmp_path / given) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the progress bar comes before it on stderr
    assert err.startswith(f"error: {tmp_path / given}: {message}; nothing written; point --input at JSON lines")
    assert "--json-keys" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name.split("/")[0] for name in files})


def test_empty_pretokenized_input_writes_nothing(tmp_path, capsys):
    pq.write_table(pa.table({"input_ids": pa.array([], type=pa.list_(pa.int32()))}), tmp_path / "ids.parquet")
    assert preprocess_main(["--input", str(tmp_path / "ids.parquet"), "--output-prefix", str(tmp_path / "out"),
                            "--json-keys", "input_ids", "--vocab-size", "50304"]) == 1
    assert "ids.parquet: no documents (empty input); nothing written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.parquet"]


def test_directory_without_input_files(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("not an input format")
    assert _run(tmp_path, tmp_path / "docs") == 1
    assert f"error: {tmp_path / 'docs'}: no input found (want a .jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def test_a_last_line_without_its_newline_is_a_document(tmp_path, reference_ids, documents):
    """Many JSON-lines writers end the file without a newline; that last document was silently dropped."""
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents[:3]))
    assert _run(tmp_path, tmp_path / "in.jsonl") == 0
    _assert_documents(tmp_path / "out_text_document", reference_ids[:3])
