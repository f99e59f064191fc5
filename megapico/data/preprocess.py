"""Dolma (JSON lines, gz, zst, parquet, HF datasets) -> Megatron .bin/.idx, parallel and streaming.

Work flows as chunks (readers.py): the main process reads raw bytes, workers parse JSON, validate and
encode (tokenizer.py: tiktoken or HF's Rust batch API), and send back numpy arrays (tokens + lengths); the main
process writes them in input order. At most 2 x workers chunks are in flight, and a JSON line is held only up to
--max-document-bytes (a longer one is a bad record), so memory stays flat whatever the input.
Text input: each file becomes an atomically finished part under `{output_prefix}.parts/`, so a re-run skips the
files already tokenized; the parts are then merged into `{output_prefix}_{key}_document.{bin,idx}`. Token-id input
(pretokenized-dolma's input_ids) is cheaper to read again than to copy, so it streams straight into the outputs,
files in name order, rows in file order, each row one document (pico-train's order).
Input that yields no documents is an error and writes nothing. Each output gets its record (provenance.py:
`{prefix}.megapico.json`, the tokenizer's fingerprint and the largest id in the data), so training can tell a
tokenizer that does not match the data.
"""

import hashlib
import json
import multiprocessing
import multiprocessing.pool
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megapico.data.indexed_dataset import DataError, IndexedDataset, IndexedDatasetWriter, merge_datasets, token_dtype
from megapico.data.provenance import data_record, max_token_id, remove_record, tokenizer_record, write_record
from megapico.data.readers import MAX_DOCUMENT_BYTES, Chunk, discover_sources, read_chunks, too_long
from megapico.data.tokenizer import Tokenizer, load_tokenizer


@dataclass
class PreprocessOptions:
    input: str
    output_prefix: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    tokenizer_model: str | None = None
    tokenizer_type: str | None = None
    tokenizer_backend: str = "auto"  # see megapico.data.tokenizer.BACKENDS
    append_eod: bool = False
    workers: int = 1
    skip_bad_records: bool = False
    hf_split: str = "train"
    vocab_size: int | None = None  # only for pretokenized input without a tokenizer
    max_document_bytes: int = MAX_DOCUMENT_BYTES  # a longer JSON line is refused (or skipped), never held whole


@dataclass
class Tally:
    """What the main process counts while writing: documents and tokens, skipped records by reason, the largest
    id written per key, and the progress bar."""

    progress: tqdm
    totals: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    max_ids: dict[str, int] = field(default_factory=dict)

    def see_ids(self, key: str, ids: np.ndarray) -> None:
        if len(ids):
            self.max_ids[key] = max(self.max_ids.get(key, -1), int(ids.max()))


@dataclass
class ChunkResult:
    tokens: dict[str, tuple[np.ndarray, np.ndarray]]
    skipped: Counter
    error: str | None
    documents_in: int
    num_bytes: int


# ---- worker side -------------------------------------------------------------------------------------
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_model: str | None, tokenizer_type: str | None, backend: str,
                 threads: int | None = None) -> None:
    """Load the tokenizer once per process. With several worker processes each gets one Rust thread, so the
    batch encoder's thread pool does not oversubscribe the cores the processes already fill."""
    global _worker_tokenizer
    if threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    _worker_tokenizer = load_tokenizer(tokenizer_model, tokenizer_type, backend) if tokenizer_model else None


def _has_lone_surrogate(text: str) -> bool:
    """JSON may escape an unpaired surrogate half (\\ud800); no encoder can take it as text."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _record_of(line: bytes, keys: list[str]) -> tuple[dict | None, str | None]:
    """One JSON line -> (its record, None), or (None, why it is a bad record)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "non-UTF-8 bytes"
    except json.JSONDecodeError:
        return None, "malformed JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if any(key not in record for key in keys):
        return None, f"no key '{next(key for key in keys if key not in record)}'"
    if any(not isinstance(record[key], str) for key in keys):
        return None, "value is not a string"
    if b"\\ud" in line.lower() and any(_has_lone_surrogate(record[key]) for key in keys):
        return None, "a \\u escape of a lone UTF-16 surrogate (not text)"
    return record, None


def _parse_lines(chunk: Chunk, keys: list[str], skipped: Counter,
                 max_line_bytes: int) -> tuple[dict[str, list[str]], str | None]:
    """JSON lines -> texts per key; a bad record (or a line longer than max_line_bytes, not parsed) is counted (and
    reported as the first error)."""
    texts: dict[str, list[str]] = {key: [] for key in keys}
    first_error = None
    for offset, line in enumerate(chunk.lines.split(b"\n")[:-1]):
        if not line.strip():
            continue
        record, reason = (None, too_long(max_line_bytes)) if len(line) > max_line_bytes else _record_of(line, keys)
        if reason:
            skipped[reason] += 1
            first_error = first_error or f"{chunk.source}:{chunk.first_row + offset}: {reason}"
            continue
        for key in keys:
            texts[key].append(record[key])
    return texts, first_error


def _check_ids(chunk: Chunk, key: str, ids: np.ndarray, lengths: np.ndarray, vocab_size: int,
               skipped: Counter) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Drop documents holding ids outside [0, vocab); report the first one by row."""
    if not len(ids) or (ids.min() >= 0 and ids.max() < vocab_size):  # two reductions, no temporaries
        return ids, lengths, None
    bad_token = (ids < 0) | (ids >= vocab_size)
    doc_of_token = np.repeat(np.arange(len(lengths)), lengths)
    bad_docs = np.unique(doc_of_token[bad_token])
    skipped["token id outside the vocabulary"] += len(bad_docs)
    error = (f"{chunk.source}:{chunk.first_row + int(bad_docs[0])}: token id {int(ids[bad_token][0])} in column "
             f"'{key}' is outside the vocabulary [0, {vocab_size})")
    keep_doc = np.ones(len(lengths), bool)
    keep_doc[bad_docs] = False
    return ids[keep_doc[doc_of_token]], lengths[keep_doc], error


def process_chunk(chunk: Chunk, keys: list[str], append_eod: bool, eod_id: int | None,
                  vocab_size: int, max_line_bytes: int = MAX_DOCUMENT_BYTES) -> ChunkResult:
    skipped: Counter = Counter()
    error = None
    if chunk.lines is not None:
        texts, error = _parse_lines(chunk, keys, skipped, max_line_bytes)
    else:
        texts = chunk.texts or {}
    if chunk.dropped is not None:  # a line the reader let go unread (too long): a bad record like the others
        skipped[chunk.dropped] += 1
        error = f"{chunk.source}:{chunk.first_row}: {chunk.dropped}"
    documents_in = len(next(iter(texts.values()))) if texts else 0
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, values in texts.items():
        bad = [row for row, text in enumerate(values) if not isinstance(text, str)]
        if bad:
            skipped["value is not a string"] += len(bad)
            error = error or f"{chunk.source}:{chunk.first_row + bad[0]}: column '{key}' value is not a string"
            values = [text for text in values if isinstance(text, str)]
        out[key] = _worker_tokenizer.encode_batch(values)
    for key, (ids, lengths) in (chunk.token_ids or {}).items():
        documents_in = len(lengths)
        ids, lengths, id_error = _check_ids(chunk, key, ids, lengths, vocab_size, skipped)
        error = error or id_error
        out[key] = (ids, lengths)
    for key, (ids, lengths) in out.items():
        empty = lengths == 0
        if empty.any():
            skipped[f"empty document ({key})"] += int(empty.sum())
            lengths = lengths[~empty]
        if append_eod:
            ends = np.cumsum(lengths)
            ids = np.insert(ids, ends, eod_id)
            lengths = lengths + 1
        out[key] = (ids, lengths)
    return ChunkResult(out, skipped, error, documents_in, chunk.num_bytes)


# ---- main side ---------------------------------------------------------------------------------------
def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _part_prefix(parts_dir: Path, index: int, source: str, key: str, options: PreprocessOptions) -> Path:
    stat = Path(source).stat()
    identity = json.dumps([os.path.abspath(source), stat.st_size, stat.st_mtime_ns, key, options.tokenizer_model,
                           options.append_eod, options.skip_bad_records])
    digest = hashlib.sha1(identity.encode()).hexdigest()[:12]
    return parts_dir / f"{index:05d}-{Path(source).name}-{key}-{digest}"


def _is_complete(prefix: Path) -> bool:
    try:
        IndexedDataset(prefix)
        return True
    except DataError:
        return False


def preprocess(options: PreprocessOptions) -> dict:
    """Build the output prefixes; returns the summary (documents, tokens, skipped by reason, seconds)."""
    start = time.perf_counter()
    sources = discover_sources(options.input)
    tokenizer = None
    if options.tokenizer_model:
        tokenizer = load_tokenizer(options.tokenizer_model, options.tokenizer_type, options.tokenizer_backend)
        note = f"; {tokenizer.backend_note}" if tokenizer.backend_note else ""
        print(f"tokenizer: {tokenizer.path} (vocab {tokenizer.vocab_size:,}, eod {tokenizer.eod_id}, "
              f"encoder {tokenizer.backend}{note})")
    # ids may have gaps (a vocabulary of 50,280 entries whose ids reach 60,025): ids and dtype bound by the largest
    vocab_size = max(tokenizer.vocab_size, tokenizer.max_id + 1) if tokenizer else options.vocab_size
    eod_id = tokenizer.eod_id if tokenizer else None
    if vocab_size is None:
        raise DataError("no tokenizer: pass --tokenizer-model (or --vocab-size for already tokenized input)")
    if options.append_eod and eod_id is None:
        raise DataError("--append-eod needs the tokenizer's end-of-document id: pass --tokenizer-model")
    dtype = token_dtype(vocab_size)
    pool = None
    # Workers use the encoder the main process chose, so an `auto` choice cannot differ between them.
    worker_args = (options.tokenizer_model, options.tokenizer_type, tokenizer.backend if tokenizer else "huggingface")
    if options.workers > 1 and tokenizer is not None:
        pool = multiprocessing.get_context("spawn").Pool(options.workers, _init_worker, (*worker_args, 1))
    else:
        _init_worker(*worker_args)
    total_bytes = sum(Path(s).stat().st_size for s in sources if Path(s).is_file())
    tally = Tally(tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", dynamic_ncols=True,
                       miniters=1, mininterval=1.0))
    outputs = {key: output_prefix_for(options.output_prefix, key) for key in options.json_keys}
    try:
        if tokenizer is None:  # token ids: as fast to read again as to copy, so no parts to resume from
            _write_sources(sources, outputs, options, dtype, pool, eod_id, vocab_size, tally,
                           before_finalize=lambda counts: _before_writing_outputs(counts, outputs, options, tally))
        else:
            _build_parts_and_merge(sources, options, outputs, dtype, pool, eod_id, vocab_size, tally)
    finally:
        tally.progress.close()
        if pool is not None:
            pool.terminate()
    built_with = tokenizer_record(tokenizer) if tokenizer else None
    for key, prefix in outputs.items():
        write_record(prefix, data_record(prefix, built_with, tally.max_ids.get(key, -1)))
    first = IndexedDataset(outputs[options.json_keys[0]])
    return dict(documents=len(first), tokens=first.num_tokens, documents_read=tally.totals["documents_in"],
                skipped=dict(tally.skipped), files=len(sources), resumed_files=tally.totals["resumed files"],
                seconds=time.perf_counter() - start, outputs=[str(outputs[key]) for key in options.json_keys])


def _before_writing_outputs(documents: dict[str, int], outputs: dict[str, str], options: PreprocessOptions,
                            tally: Tally) -> None:
    """Refuse input that gave no documents (training would only blame the split), then drop the outputs' old
    records: a record must never describe data it was not written with."""
    for key, count in documents.items():
        if count == 0:
            raise _no_documents_error(options, key, tally)
    for prefix in outputs.values():
        remove_record(prefix)


def _no_documents_error(options: PreprocessOptions, key: str, tally: Tally) -> DataError:
    read = tally.totals["documents_in"]
    fix = (f"nothing written; point --input at JSON lines, parquet or a saved HF dataset whose '{key}' field holds "
           f"the documents (--json-keys names the field)")
    if read == 0 and not tally.totals["resumed files"]:
        return DataError(f"{options.input}: no documents (empty input); {fix}")
    reasons = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(tally.skipped.items()))
    return DataError(f"{options.input}: every document is empty or skipped ({read:,} read; {reasons or 'none'}); "
                     f"{fix}")


def _write_sources(sources: list[str], prefixes: dict[str, str | Path], options: PreprocessOptions, dtype: type,
                   pool: multiprocessing.pool.Pool | None, eod_id: int | None, vocab_size: int, tally: Tally,
                   before_finalize: Callable[[dict[str, int]], None] | None = None) -> None:
    """`sources`, in order, into one writer per key (atomic: nothing appears under `prefixes` unless all succeed).
    before_finalize gets the documents per key and may refuse them (raise) before anything is renamed into place."""
    writers = {key: IndexedDatasetWriter(prefix, dtype) for key, prefix in prefixes.items()}
    try:
        for source in sources:
            _process_source(source, options, writers, pool, eod_id, vocab_size, tally)
        if before_finalize is not None:
            before_finalize({key: writer.num_documents for key, writer in writers.items()})
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.finalize()


def _build_parts_and_merge(sources: list[str], options: PreprocessOptions, outputs: dict[str, str], dtype: type,
                           pool: multiprocessing.pool.Pool | None, eod_id: int | None, vocab_size: int,
                           tally: Tally) -> None:
    """Each source into its own part under {output_prefix}.parts/ (a re-run skips the finished ones), then the
    parts merged in source order; parts without a document between them are removed and refused."""
    parts_dir = Path(f"{options.output_prefix}.parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    part_prefixes: dict[str, list[Path]] = {key: [] for key in options.json_keys}
    for index, source in enumerate(sources):
        prefixes = {key: _part_prefix(parts_dir, index, source, key, options) for key in options.json_keys}
        for key in options.json_keys:
            part_prefixes[key].append(prefixes[key])
        if all(_is_complete(prefix) for prefix in prefixes.values()):
            tally.progress.update(Path(source).stat().st_size if Path(source).is_file() else 0)
            tally.totals["resumed files"] += 1
            for key, prefix in prefixes.items():  # written by an earlier run: its ids were not seen in this one
                tally.max_ids[key] = max(tally.max_ids.get(key, -1), max_token_id(prefix))
            continue
        _write_sources([source], prefixes, options, dtype, pool, eod_id, vocab_size, tally)
    try:
        _before_writing_outputs({key: sum(len(IndexedDataset(prefix)) for prefix in prefixes)
                                 for key, prefixes in part_prefixes.items()}, outputs, options, tally)
    except DataError:
        shutil.rmtree(parts_dir)  # empty parts: nothing worth resuming from
        raise
    for key, prefixes in part_prefixes.items():
        merge_datasets(prefixes, outputs[key])
    shutil.rmtree(parts_dir)


def _process_source(source: str, options: PreprocessOptions, writers: dict[str, IndexedDatasetWriter],
                    pool: multiprocessing.pool.Pool | None, eod_id: int | None, vocab_size: int, tally: Tally) -> None:
    args = (options.json_keys, options.append_eod, eod_id, vocab_size, options.max_document_bytes)
    in_flight: deque = deque()

    def consume(result: ChunkResult) -> None:
        if result.error and not options.skip_bad_records:
            raise DataError(f"{result.error} (fix the record, or pass --skip-bad-records to count and skip it)")
        for key, (ids, lengths) in result.tokens.items():
            writers[key].add_documents(ids, lengths)
            tally.see_ids(key, ids)
        tally.skipped.update(result.skipped)
        tally.totals["documents_in"] += result.documents_in
        tally.totals["tokens"] += sum(len(ids) for ids, _ in result.tokens.values())
        tally.progress.update(result.num_bytes)
        tally.progress.set_postfix(docs=tally.totals["documents_in"], tokens=tally.totals["tokens"], refresh=False)

    for chunk in read_chunks(source, options.json_keys, options.hf_split, options.max_document_bytes):
        if pool is None:
            consume(process_chunk(chunk, *args))
            continue
        in_flight.append(pool.apply_async(process_chunk, (chunk, *args)))
        while len(in_flight) >= 2 * options.workers:
            consume(in_flight.popleft().get())
    while in_flight:
        consume(in_flight.popleft().get())
