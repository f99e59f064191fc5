"""tools/preprocess_data.py on real Dolma documents and every supported input format and failure."""

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import SAMPLE_DOCUMENTS, TOKENIZER
from preprocess_data import main as preprocess_main
from tokenizers import Tokenizer

from megapico.data import encode_chunk
from megapico.data import preprocess as preprocess_data
from megapico.data.document_sources import read_document_sources
from megapico.data.indexed_dataset import IndexedDataset
from megapico.data.preprocess import PreprocessOptions, preprocess
from megapico.data.provenance import read_record
from megapico.data.readers import Chunk, discover_sources, source_identity

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


def _sources_of(prefix):
    """Every document's (source, row), in order."""
    sources = read_document_sources(prefix)
    indices, rows = sources.locate(slice(None))
    return [(sources.sources[i], int(row)) for i, row in zip(indices, rows, strict=True)]


def _same_files(prefix_a, prefix_b):
    for suffix in (".bin", ".idx", ".sources.bin"):
        assert Path(f"{prefix_a}{suffix}").read_bytes() == Path(f"{prefix_b}{suffix}").read_bytes(), suffix


def test_document_sources_name_each_kept_documents_line(tmp_path):
    """Blank lines, bad records and empty documents take their line numbers with them: the rows are the lines of the
    documents written, in order (the fast parser hands the chunk to the line-by-line one here)."""
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "one"}\n\n{"text": "two"}\n{broken\n{"text": ""}\n'
                                        b'{"text": "six", "meta": NaN}\n{"text": "seven"}')
    assert _run(tmp_path, tmp_path / "in.jsonl", "--skip-bad-records") == 0
    prefix = tmp_path / "out_text_document"
    assert _sources_of(prefix) == [(str(tmp_path / "in.jsonl"), row) for row in (1, 3, 6, 7)]
    assert [d.tolist()[-1] for d in IndexedDataset(prefix)] == [EOD] * 4


def test_document_sources_of_parquet_rows_and_several_files(tmp_path, documents):
    pq.write_table(pa.table({"text": [documents[0], "", None, documents[1]]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": documents[2]}) + "\n")
    assert _run(tmp_path, str(tmp_path / "*.*"), "--skip-bad-records") == 0
    assert _sources_of(tmp_path / "out_text_document") == [
        (str(tmp_path / "a.parquet"), 1), (str(tmp_path / "a.parquet"), 4), (str(tmp_path / "b.jsonl"), 1)]


def test_workers_that_read_whole_files_write_the_same_bytes(tmp_path, documents):
    """Four equal files and two workers: each worker builds whole files itself; the output equals one process's."""
    (tmp_path / "in").mkdir()
    for index in range(4):
        lines = [json.dumps({"text": text}) for text in documents[index * 200:(index + 1) * 200]]
        (tmp_path / "in" / f"{index}.jsonl").write_text("\n".join(lines) + "\n")
    assert preprocess_data._workers_read_whole_sources(
        {str(path): path.stat().st_size for path in (tmp_path / "in").iterdir()}, 2)
    assert _run(tmp_path, tmp_path / "in", "--workers", "2", name="two") == 0
    assert _run(tmp_path, tmp_path / "in", name="one") == 0
    _same_files(tmp_path / "two_text_document", tmp_path / "one_text_document")
    assert _sources_of(tmp_path / "two_text_document")[199:201] == [(str(tmp_path / "in" / "0.jsonl"), 200),
                                                                    (str(tmp_path / "in" / "1.jsonl"), 1)]


@pytest.fixture
def memory_fs():
    import fsspec

    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/", recursive=True)


def test_memory_url_directory_builds_the_same_bytes_as_the_local_path(tmp_path, memory_fs, sample_prefix):
    for path in sorted(SAMPLE_DOCUMENTS.glob("*.json.gz")):
        memory_fs.pipe(f"/dolma/documents/{path.name}", path.read_bytes())
    memory_fs.pipe("/dolma/documents/notes.txt", b"not an input")
    assert discover_sources("memory://dolma/documents") == [
        f"memory:///dolma/documents/{path.name}" for path in sorted(SAMPLE_DOCUMENTS.glob("*.json.gz"))]
    assert _run(tmp_path, "memory://dolma/documents", "--workers", "2") == 0  # read here: workers cannot see it
    _same_files(tmp_path / "out_text_document", sample_prefix)
    assert {source for source, _ in _sources_of(tmp_path / "out_text_document")} == set(
        discover_sources("memory://dolma/documents"))


def test_file_url_glob_zst_and_parquet(tmp_path, memory_fs, documents, reference_ids):
    lines = [json.dumps({"text": t}) for t in documents[:90]]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        ("\n".join(lines[:40]) + "\n").encode()))
    pq.write_table(pa.table({"text": documents[40:90]}), tmp_path / "in" / "b.parquet")
    url = f"file://{tmp_path}/in/*"
    assert discover_sources(url) == [f"file://{tmp_path}/in/a.jsonl.zst", f"file://{tmp_path}/in/b.parquet"]
    assert _run(tmp_path, url, name="url") == 0
    _assert_documents(tmp_path / "url_text_document", reference_ids[:90])
    assert _run(tmp_path, tmp_path / "in", name="local") == 0
    _same_files(tmp_path / "url_text_document", tmp_path / "local_text_document")
    assert _sources_of(tmp_path / "url_text_document")[40] == (f"file://{tmp_path}/in/b.parquet", 1)
    memory_fs.pipe("/p/b.parquet", (tmp_path / "in" / "b.parquet").read_bytes())
    assert _run(tmp_path, "memory://p/b.parquet", name="memory") == 0
    _assert_documents(tmp_path / "memory_text_document", reference_ids[40:90])


def test_url_errors_name_the_url(tmp_path, capsys, memory_fs):
    memory_fs.pipe("/bad/in.jsonl", b'{"text": "fine"}\n{"text": "broken\n')
    memory_fs.pipe("/gz/in.json.gz", b"this is not gzip")
    assert _run(tmp_path, "memory://bad/in.jsonl") == 1
    assert "error: memory://bad/in.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert _run(tmp_path, "memory://gz") == 1
    assert "error: memory:///gz/in.json.gz: unreadable (" in capsys.readouterr().err
    assert _run(tmp_path, "memory://nothing/here/*.jsonl") == 1
    assert "error: memory://nothing/here/*.jsonl: no input found" in capsys.readouterr().err
    assert not list(tmp_path.glob("out_text_document*"))  # nothing final (out.parts/ stays, to resume)


def test_url_identity_changes_with_the_file(memory_fs):
    memory_fs.pipe("/x/a.jsonl", b'{"text": "a"}\n')
    before = source_identity("memory://x/a.jsonl")
    assert before[:2] == ["memory://x/a.jsonl", 14] and len(before) == 3  # URL, size, created
    memory_fs.pipe("/x/a.jsonl", b'{"text": "ab"}\n')
    assert source_identity("memory://x/a.jsonl")[1] == 15


@pytest.mark.parametrize("content", [b"", b'{"text": ""}\n'])
def test_allow_no_documents_writes_empty_outputs(tmp_path, content):
    (tmp_path / "in.jsonl").write_bytes(content)
    summary = preprocess(PreprocessOptions(input=str(tmp_path / "in.jsonl"), output_prefix=str(tmp_path / "out"),
                                           tokenizer_model=str(TOKENIZER), append_eod=True, allow_no_documents=True))
    prefix = tmp_path / "out_text_document"
    assert summary["documents"] == 0 and len(IndexedDataset(prefix)) == 0
    assert read_record(prefix)["max_token_id"] == -1 and _sources_of(prefix) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.jsonl", *(f"out_text_document{s}" for s in (".bin", ".idx", ".megapico.json", ".sources.bin",
                                                          ".sources.json"))])


def test_fast_and_line_by_line_parsers_agree(documents):
    """msgspec's one call per chunk and json's line by line give the same texts and rows on the same lines."""
    lines = b"".join(json.dumps({"id": i, "text": t, "metadata": {"n": [i]}}).encode() + b"\n"
                     for i, t in enumerate(documents[:500]))
    chunk = Chunk("x.jsonl", 7, len(lines), lines=lines)
    fast = encode_chunk._parse_lines_fast(chunk, ["text"], 1 << 20)
    slow = encode_chunk._parse_lines(Chunk("x.jsonl", 7, 0, lines=lines + b"\n"), ["text"], Counter(), 1 << 20)
    assert fast[0] == slow[0] == {"text": documents[:500]}
    assert fast[1].tolist() == slow[1].tolist() == list(range(7, 507))
