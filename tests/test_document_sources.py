"""Per-document sources beside .bin/.idx (document_sources.py): exact bytes, round trips, atomic output, merging equal
to one write, hostile files refused; and tools/trace_data.py tracing documents, samples, steps and train_data back to
`source:row` and the text there."""

import json
import struct

import numpy as np
import pytest
from conftest import SAMPLE_DOCUMENTS, TOKENIZER
from trace_data import main as trace_main

from megapico.config import load_config, save_config
from megapico.data import document_sources
from megapico.data.document_sources import (
    DocumentSourcesWriter,
    has_document_sources,
    merge_document_sources,
    read_document_sources,
)
from megapico.data.gpt_dataset import GPTDataset
from megapico.data.indexed_dataset import DataError, IndexedDataset, IndexedDatasetWriter, merge_datasets
from megapico.data.pretokenized_dataset import PretokenizedDataset
from megapico.data.sample_trace import SampleTracer
from megapico.training.sample_order import open_run

SOURCES = [("a.jsonl", [1, 2, 4]), ("b.json.gz", [9]), ("a.jsonl", [5]), ("c.parquet", [1, 2])]


def write_prefix(prefix, sources=SOURCES, lengths=None):
    """A .bin/.idx prefix of one document per row of `sources` (document i: tokens 100 i, 100 i + 1, ...) and its
    document sources."""
    count = sum(len(rows) for _, rows in sources)
    lengths = lengths or [3] * count
    with IndexedDatasetWriter(prefix, np.uint16) as data, DocumentSourcesWriter(prefix) as writer:
        for i, length in enumerate(lengths):
            data.add_document(100 * i + np.arange(length))
        for source, rows in sources:
            writer.add(source, np.array(rows, dtype=np.int64))
    return prefix


def test_bytes_of_a_hand_computed_case(tmp_path):
    write_prefix(tmp_path / "d")
    header = json.loads((tmp_path / "d.sources.json").read_text())
    assert header == {"format": 1, "documents": 7, "sources": ["a.jsonl", "b.json.gz", "c.parquet"]}
    entries = [(0, 1), (0, 2), (0, 4), (1, 9), (0, 5), (2, 1), (2, 2)]
    assert (tmp_path / "d.sources.bin").read_bytes() == struct.pack("<7Q", *(s << 40 | r for s, r in entries))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx", "d.sources.bin", "d.sources.json"]


def test_round_trip(tmp_path):
    sources = read_document_sources(write_prefix(tmp_path / "d"))
    assert len(sources) == 7 and sources.sources == ["a.jsonl", "b.json.gz", "c.parquet"]
    assert [sources.source_of(i) for i in range(7)] == [("a.jsonl", 1), ("a.jsonl", 2), ("a.jsonl", 4),
                                                        ("b.json.gz", 9), ("a.jsonl", 5), ("c.parquet", 1),
                                                        ("c.parquet", 2)]
    indices, rows = sources.locate(np.array([6, 3, 0]))
    assert indices.tolist() == [2, 1, 0] and rows.tolist() == [2, 9, 1]
    assert has_document_sources(tmp_path / "d")


def test_a_source_without_documents_is_not_listed_and_bad_rows_are_refused(tmp_path):
    with DocumentSourcesWriter(tmp_path / "d") as writer:
        writer.add("empty.jsonl", np.array([], dtype=np.int64))
        writer.add("x.jsonl", np.array([3]))
        with pytest.raises(DataError, match=r"^y\.jsonl: row 0 is outside 1\.\.1099511627775"):
            writer.add("y.jsonl", np.array([0]))
    assert json.loads((tmp_path / "d.sources.json").read_text())["sources"] == ["x.jsonl"]


def test_abort_and_an_exception_leave_nothing_new(tmp_path):
    writer = DocumentSourcesWriter(tmp_path / "d")
    writer.add("a.jsonl", np.array([1, 2]))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    write_prefix(tmp_path / "d")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError), DocumentSourcesWriter(tmp_path / "d") as writer:
        writer.add("other.jsonl", np.array([1, 2, 3, 4, 5, 6, 7]))
        raise RuntimeError("killed mid-write")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_link_at_a_final_name_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "d.sources.json").symlink_to(victim)
    (tmp_path / "d.sources.bin").symlink_to(victim)
    write_prefix(tmp_path / "d")
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "d.sources.json").is_symlink() and len(read_document_sources(tmp_path / "d")) == 7


def test_merge_is_byte_identical_to_one_write(tmp_path):
    parts = [SOURCES[:2], SOURCES[2:3], SOURCES[3:]]  # a.jsonl again in the second part, after b.json.gz
    lengths = [3, 1, 4, 1, 5, 9, 2]
    write_prefix(tmp_path / "whole", SOURCES, lengths)
    prefixes, start = [], 0
    for i, part in enumerate(parts):
        count = sum(len(rows) for _, rows in part)
        with IndexedDatasetWriter(tmp_path / f"part{i}", np.uint16) as data:
            for document in range(start, start + count):
                data.add_document(100 * document + np.arange(lengths[document]))
        with DocumentSourcesWriter(tmp_path / f"part{i}") as writer:
            for source, rows in part:
                writer.add(source, np.array(rows))
        prefixes.append(tmp_path / f"part{i}")
        start += count
    merge_datasets(prefixes, tmp_path / "merged")
    merge_document_sources(prefixes, tmp_path / "merged")
    for suffix in (".bin", ".idx", ".sources.json", ".sources.bin"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == (tmp_path / f"whole{suffix}").read_bytes(), suffix


def test_merge_refuses_a_prefix_without_sources(tmp_path):
    write_prefix(tmp_path / "a")
    with IndexedDatasetWriter(tmp_path / "megatron", np.uint16) as data:
        data.add_document(np.arange(3))
    with pytest.raises(DataError, match=r"megatron\.sources\.json: missing, so .*megatron has no per-document "
                                        r"sources \(data built by Megatron-LM or an older megapico has none\); "
                                        r"rebuild the prefix with tools/preprocess_data\.py"):
        merge_document_sources([tmp_path / "a", tmp_path / "megatron"], tmp_path / "out")
    assert not has_document_sources(tmp_path / "out") and not list(tmp_path.glob("*tmp*"))


def _rewrite_header(prefix, **changes):
    path = prefix.parent / f"{prefix.name}.sources.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("damage, message", [
    (lambda p: _rewrite_header(p, documents=6), r"d\.sources\.bin: 56 bytes, but .*d\.sources\.json counts 6 "
                                                r"documents of 8 bytes \(truncated"),
    (lambda p: (p.parent / "d.sources.bin").write_bytes((p.parent / "d.sources.bin").read_bytes()[:-3]),
     r"d\.sources\.bin: 53 bytes, but .* counts 7 documents"),
    (lambda p: (_rewrite_header(p, documents=8),
                (p.parent / "d.sources.bin").write_bytes((p.parent / "d.sources.bin").read_bytes()[:16] * 4)),
     r"d\.sources\.json: 8 documents, but .*d\.idx holds 7: these sources are not this data's"),
    (lambda p: _rewrite_header(p, sources=["a.jsonl", "b.json.gz"]),
     r"d\.sources\.bin: document 5 names source 2 of 2 and row 1 \(corrupt\)"),
    (lambda p: (p.parent / "d.sources.bin").write_bytes(struct.pack("<7Q", *([1] * 6 + [0]))),
     r"d\.sources\.bin: document 6 names source 0 of 3 and row 0 \(corrupt\)"),
    (lambda p: _rewrite_header(p, sources=["a.jsonl", "a.jsonl", "c"]), r"its sources repeat"),
    (lambda p: _rewrite_header(p, format=2), r"not a document-sources header of format 1"),
    (lambda p: _rewrite_header(p, documents="7"), r"not a document-sources header of format 1"),
    (lambda p: (p.parent / "d.sources.json").write_text("[" * 100_000), r"d\.sources\.json: not JSON"),
    (lambda p: (p.parent / "d.sources.json").write_bytes(b" " * (document_sources.MAX_HEADER_BYTES + 1)),
     r"larger than the 64 MiB a document-sources header may hold"),
    (lambda p: (p.parent / "d.sources.bin").unlink(), r"d\.sources\.bin: missing, so .*d has no per-document"),
])
def test_hostile_files_are_refused_in_one_line(tmp_path, damage, message):
    prefix = write_prefix(tmp_path / "d")
    damage(prefix)
    with pytest.raises(DataError, match=message) as caught:
        read_document_sources(prefix)
    assert "\n" not in str(caught.value) and "; rebuild the prefix with tools/preprocess_data.py" in str(caught.value)


# ---- tracing -----------------------------------------------------------------------------------------------
def sourced_prefix(tmp_path, count=40):
    """`count` documents of varied lengths from two real JSON-lines files (a blank line in the first, so rows are
    lines, not record numbers); document i's text is "document i"."""
    lengths = [5 + (7 * i) % 23 for i in range(count)]
    first, second = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    half = count // 2
    first.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" + ("\n" if i == 1 else "")
                     for i in range(half)))
    second.write_text("".join(json.dumps({"text": f"document {i}", "id": i}) + "\n" for i in range(half, count)))
    rows = {i: (str(first), i + 1 + (i >= 2)) for i in range(half)}
    rows.update({i: (str(second), i - half + 1) for i in range(half, count)})
    prefix = tmp_path / "data" / "d"
    with IndexedDatasetWriter(prefix, np.uint16) as data, DocumentSourcesWriter(prefix) as writer:
        for i in range(count):
            data.add_document(100 * i + np.arange(lengths[i]))
            writer.add(rows[i][0], np.array([rows[i][1]]))
    return prefix, rows, lengths


def make_run(tmp_path, prefix, states=((0, 0, 2), (2, 8, 2)), **overrides):
    """A run directory as pretrain.py leaves it, as far as tracing reads it: config.yaml, and per checkpoint its
    config.yaml and megapico_state.json (step, consumed samples, DP); micro batch 2 x DP 2 = global batch 4."""
    settings = {"model_preset": "tiny", "data.train_data_path": f"[{prefix}]", "data.split": "1,0,0",
                "data.seq_len": 16, "training.max_steps": 6, "training.lr_warmup_steps": 1,
                "training.micro_batch_size": 2, **overrides}
    config = load_config(None, [f"{key}={value}" for key, value in settings.items()])
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    save_config(config, run / "config.yaml")
    for step, consumed, dp in states:
        directory = run / "checkpoints" / f"step_{step}"
        directory.mkdir()
        save_config(config, directory / "config.yaml")
        (directory / "megapico_state.json").write_text(json.dumps(
            dict(step=step, consumed_samples=consumed, tensor_parallel_size=1, data_parallel_size=dp, bf16=False)))
    return run


def trace_json(capsys, *argv):
    assert trace_main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_trace_a_document(tmp_path, capsys):
    prefix, rows, lengths = sourced_prefix(tmp_path)
    assert trace_main(["--data-prefix", str(prefix), "--document", "3", "--show-text"]) == 0
    assert capsys.readouterr().out == (f"document 3 of {prefix} ({lengths[3]} tokens) <- {tmp_path}/one.jsonl:5\n"
                                       f"      document 3\n")
    assert trace_json(capsys, "--data-prefix", str(prefix), "--document", "25", "0")["documents"] == [
        dict(prefix=str(prefix), document=25, tokens=lengths[25], source=str(tmp_path / "two.jsonl"), row=6),
        dict(prefix=str(prefix), document=0, tokens=lengths[0], source=str(tmp_path / "one.jsonl"), row=1)]
    assert trace_main(["--data-prefix", str(prefix), "--document", "40"]) == 1
    assert capsys.readouterr().err == f"error: {prefix}: document 40 is outside its 40 documents\n"
    (tmp_path / "one.jsonl").write_text('{"text": "document 0"}\n')  # the source changed since
    assert trace_main(["--data-prefix", str(prefix), "--document", "3", "--show-text"]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path}/one.jsonl: has no line or row 5 (changed since it was "
                                       f"preprocessed?); re-preprocess it, or leave out --show-text\n")
    (tmp_path / "one.jsonl").unlink()
    assert trace_main(["--data-prefix", str(prefix), "--document", "3", "--show-text"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/one.jsonl: unreadable") and err.count("\n") == 1
    assert err.endswith("(run from the directory the data was preprocessed in, or leave out --show-text)\n")


def test_trace_a_step_to_its_documents_and_text(tmp_path, capsys):
    prefix, rows, lengths = sourced_prefix(tmp_path)
    run = make_run(tmp_path, prefix)
    result = trace_json(capsys, "--run-dir", str(run), "--step", "2", "--show-text")
    order = open_run(run)
    assert result["global_batch"] == 4 and [s["sample"] for s in result["samples"]] == [4, 5, 6, 7]
    for sample in result["samples"]:
        assert sample["step"] == 2 and sample["tokens"] == 17
        tokens, at = [], 0
        for piece in sample["documents"]:
            document = piece["document"]
            assert (piece["source"], piece["row"]) == rows[document] and piece["text"] == f"document {document}"
            assert piece["sample_tokens"][0] == at
            at = piece["sample_tokens"][1]
            start, end = piece["document_tokens"]
            tokens.append(100 * document + np.arange(start, end))  # the document's tokens, as written
        np.testing.assert_array_equal(np.concatenate(tokens), order.dataset[sample["sample"]])
    assert any(len(sample["documents"]) > 1 for sample in result["samples"])  # samples that span documents
    without_text = [{key: value for key, value in piece.items() if key != "text"}
                    for piece in result["samples"][1]["documents"]]
    assert trace_json(capsys, "--run-dir", str(run), "--sample", "5")["samples"] == [
        {**result["samples"][1], "documents": without_text}]


def test_trace_text_output_of_a_sample(tmp_path, capsys):
    prefix, rows, _ = sourced_prefix(tmp_path)
    run = make_run(tmp_path, prefix)
    pieces = SampleTracer(open_run(run).dataset).pieces(9)
    assert trace_main(["--run-dir", str(run), "--sample", "9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sample 9 (step 3 of {run}, global batch 4): 17 tokens from {len(pieces)} document(s)"
    at = 0
    for line, piece in zip(lines[1:], pieces, strict=True):
        assert line == (f"  tokens {at}:{at + piece.length} = {prefix} document {piece.document} tokens "
                        f"{piece.offset}:{piece.offset + piece.length} <- {':'.join(map(str, rows[piece.document]))}")
        at += piece.length


def test_train_data_of_a_checkpoint_is_the_next_steps_batch(tmp_path, capsys):
    from megapico.training.learning_dynamics import save_train_data

    prefix, _, _ = sourced_prefix(tmp_path)
    run = make_run(tmp_path, prefix)
    order = open_run(run)
    saved = run / "checkpoints" / "step_2" / "learning_dynamics" / "train_data"
    save_train_data(np.stack([order.dataset[i] for i in range(8, 12)]), None, saved)
    traced = trace_json(capsys, "--run-dir", str(run), "--train-data", "2")
    assert traced["samples"] == trace_json(capsys, "--run-dir", str(run), "--step", "3")["samples"]
    save_train_data(np.stack([order.dataset[i] for i in range(4, 8)]), None, saved)  # another step's batch
    capsys.readouterr()  # datasets' progress bars
    assert trace_main(["--run-dir", str(run), "--train-data", "2"]) == 1
    assert capsys.readouterr().err == (f"error: {saved}: a row differs from sample 8 of the run's order (the data or "
                                       f"its sample-index cache changed since the run); re-run on the run's own data\n")
    assert trace_main(["--run-dir", str(run), "--train-data", "0"]) == 1
    assert "train_data: missing; this run saved train_data at steps [2]" in capsys.readouterr().err


@pytest.mark.parametrize("argv, states, error", [
    (["--step", "7"], ((0, 0, 2),), "step 7 is outside the run's steps 1..6 (training.max_steps of its config.yaml)"),
    (["--sample", "24"], ((0, 0, 2),), "sample 24 is outside the run's 6 steps x 4 samples (0..23)"),
    (["--step", "1"], ((0, 0, 2), (2, 8, 2), (4, 12, 1)),
     "megapico_state.json: 12 samples by step 4, not 4 per step"),
    (["--step", "1"], (), "no checkpoint yet, and config.yaml leaves training.global_batch_size to the DP size"),
])
def test_run_errors_are_one_line(tmp_path, capsys, argv, states, error):
    prefix, _, _ = sourced_prefix(tmp_path)
    run = make_run(tmp_path, prefix, states)
    assert trace_main(["--run-dir", str(run), *argv]) == 1
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1


def test_a_run_whose_order_changed_at_a_resume_is_refused(tmp_path, capsys):
    prefix, _, _ = sourced_prefix(tmp_path)
    run = make_run(tmp_path, prefix)
    save_config(load_config(run / "config.yaml", ["training.max_steps=9"], received=True), run / "config.yaml")
    assert trace_main(["--run-dir", str(run), "--step", "1"]) == 1
    assert "step_0/config.yaml: the data section or training.max_steps differs from" in capsys.readouterr().err


def test_data_without_sources_is_named(tmp_path, capsys):
    prefix, _, _ = sourced_prefix(tmp_path)
    for path in prefix.parent.glob("d.sources.*"):
        path.unlink()
    run = make_run(tmp_path, prefix)
    assert trace_main(["--run-dir", str(run), "--step", "1"]) == 1
    assert capsys.readouterr().err == (f"error: {prefix}.sources.json: missing, so {prefix} has no per-document "
                                       f"sources (data built by Megatron-LM or an older megapico has none); rebuild "
                                       f"the prefix with tools/preprocess_data.py to trace its documents\n")


def test_blends_and_pretokenized_samples(tmp_path):
    from megapico.data.builders import build_dataset

    prefix, rows, _ = sourced_prefix(tmp_path)
    other = write_prefix(tmp_path / "other" / "o", [("z.jsonl", list(range(1, 31)))], [9] * 30)
    blend = build_dataset(["0.5", str(prefix), "0.5", str(other)], "train", 20, 8, 1, "1,0,0")
    tracer = SampleTracer(blend)
    prefixes = {tracer.pieces(i)[0].prefix for i in range(20)}
    assert prefixes == {str(prefix), str(other)}
    pretokenized = write_prefix(tmp_path / "rows" / "p", [("rows.parquet", [1, 2, 3])], [9, 9, 9])
    pieces = SampleTracer(PretokenizedDataset(IndexedDataset(pretokenized), 8)).pieces(2)
    assert [(p.document, p.offset, p.length, p.source, p.row) for p in pieces] == [(2, 0, 9, "rows.parquet", 3)]
    gpt = GPTDataset(IndexedDataset(prefix), "train", 10, 16, 3, "1,0,0")
    assert all(rows[p.document] == (p.source, p.row) for i in range(10) for p in SampleTracer(gpt).pieces(i))


def test_preprocessed_sample_traces_back_to_its_line(sample_prefix, tmp_path, capsys):
    """End to end: the shipped sample preprocessed (conftest's sample_prefix), a training sample's first document is
    found at its file:line, and the text there holds the document's detokenized tokens."""
    from megapico.data.tokenizer import load_tokenizer

    assert has_document_sources(sample_prefix)
    run = make_run(tmp_path, sample_prefix, **{"data.seq_len": 128, "data.split": "969,30,1"})
    first = trace_json(capsys, "--run-dir", str(run), "--sample", "5", "--show-text")["samples"][0]["documents"][0]
    assert first["source"].startswith(str(SAMPLE_DOCUMENTS)) and first["row"] >= 1
    start, end = first["document_tokens"]
    tokenizer = load_tokenizer(str(TOKENIZER))
    ids = [t for t in IndexedDataset(sample_prefix).get(first["document"], start, end - start).tolist()
           if t != tokenizer.eod_id]
    decoded = max(tokenizer.decode_batch([ids])[0].split("\ufffd"), key=len).strip()  # whole characters only
    assert len(decoded) > 20 and decoded[:40] in first["text"]
