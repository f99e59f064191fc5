"""Dolma (JSON lines, gz, zst, parquet, HF datasets; local paths or fsspec URLs) -> Megatron .bin/.idx, parallel
and streaming, at the speed of the tokenizer.

Work flows as chunks (readers.py) through process_chunk: parse JSON (msgspec, keeping only the --json-keys fields),
validate, encode (tokenizer.py: tiktoken or HF's Rust batch API), and return numpy arrays per key: ids in the output
dtype, lengths, and each kept document's 1-based source line or row. At most 2 x workers chunks are in flight, and a
JSON line is held only up to --max-document-bytes (a longer one is a bad record), so memory stays flat whatever the
input. Who reads depends on the input, so that the main process stays nearly idle where it can:
- several sources, none larger than an even share: each worker reads, decompresses, encodes and writes whole
  sources (largest first), and the main process only waits;
- otherwise (one big file, a few unequal ones, memory:// input): the main process reads and decompresses chunks
  (the one serial step), the workers encode them, and the main process writes the results in order.
Text input: each file becomes an atomically finished part under `{output_prefix}.parts/`, so a re-run skips the
files already tokenized; the parts are then merged into `{output_prefix}_{key}_document.{bin,idx}`. Token-id input
(pretokenized-dolma's input_ids) is cheaper to read again than to copy, so it streams straight into the outputs,
files in name order, rows in file order, each row one document (pico-train's order).
Beside every prefix (parts and outputs) document_sources.py records each document's source and row.
Input that yields no documents is an error and writes nothing, unless allow_no_documents (one task of a distributed
build may get an empty file): then the outputs are written empty. Each output gets its record (provenance.py:
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
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
from tqdm import tqdm

from megapico.data.document_sources import DocumentSourcesWriter, has_document_sources
from megapico.data.indexed_dataset import DataError, IndexedDataset, IndexedDatasetWriter, token_dtype
from megapico.data.merge import merge_prefixes
from megapico.data.provenance import data_record, max_token_id, remove_record, tokenizer_record, write_record
from megapico.data.readers import (
    MAX_DOCUMENT_BYTES,
    Chunk,
    discover_sources,
    is_process_local,
    read_chunks,
    source_identity,
    source_size,
    too_long,
)
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
    allow_no_documents: bool = False  # input without documents writes empty outputs instead of raising


@dataclass
class Tally:
    """What is counted while writing: documents and tokens, skipped records by reason, the largest id written per
    key, and (in the main process) the progress bar. A worker that builds whole parts counts into its own, without a
    bar, and the main process adds it in."""

    progress: tqdm | None = None
    totals: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    max_ids: dict[str, int] = field(default_factory=dict)

    def see_ids(self, key: str, ids: np.ndarray) -> None:
        if len(ids):
            self.max_ids[key] = max(self.max_ids.get(key, -1), int(ids.max()))

    def advance(self, num_bytes: int) -> None:
        if self.progress is not None:
            self.progress.update(num_bytes)
            self.progress.set_postfix(docs=self.totals["documents_in"], tokens=self.totals["tokens"], refresh=False)

    def add(self, other: "Tally", num_bytes: int) -> None:
        self.totals.update(other.totals)
        self.skipped.update(other.skipped)
        for key, value in other.max_ids.items():
            self.max_ids[key] = max(self.max_ids.get(key, -1), value)
        self.advance(num_bytes)


class Documents(NamedTuple):
    """Documents of one key: flat ids, their lengths, and each one's 1-based line (or row) in its source."""

    ids: np.ndarray
    lengths: np.ndarray
    rows: np.ndarray

    def keep(self, kept: np.ndarray) -> "Documents":
        """Only the documents where `kept` (a bool per document) is true."""
        if kept.all():
            return self
        return Documents(self.ids[np.repeat(kept, self.lengths)], self.lengths[kept], self.rows[kept])


@dataclass
class ChunkResult:
    documents: dict[str, Documents]
    skipped: Counter
    error: str | None
    documents_in: int
    num_bytes: int


# ---- worker side -------------------------------------------------------------------------------------
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_model: str, tokenizer_type: str | None, backend: str, threads: int) -> None:
    """Load the tokenizer once per worker process. With several worker processes each gets one Rust thread, so the
    batch encoder's thread pool does not oversubscribe the cores the processes already fill."""
    global _worker_tokenizer
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    _worker_tokenizer = load_tokenizer(tokenizer_model, tokenizer_type, backend)


def _encode_here(tokenizer: Tokenizer | None) -> None:
    """No worker processes: this one encodes, with the tokenizer it has loaded already."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


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


@lru_cache(maxsize=8)
def _record_decoder(keys: tuple[str, ...]) -> msgspec.json.Decoder:
    """A JSON-lines decoder that builds only the `keys` fields, each a str, and skips the rest unbuilt: about 8x
    json.loads on Dolma (whose metadata fields would otherwise be built and thrown away). It refuses whatever
    json.loads refuses and a little more (NaN, a lone surrogate in any field); a chunk it refuses is parsed again line
    by line with json, which names each bad record and its reason exactly."""
    names = {f"field{i}": key for i, key in enumerate(keys)}
    return msgspec.json.Decoder(msgspec.defstruct("Record", [(name, str) for name in names], rename=names, gc=False))


def _parse_lines_fast(chunk: Chunk, keys: list[str],
                      max_line_bytes: int) -> tuple[dict[str, list[str]], np.ndarray] | None:
    """Every line of the chunk a good record, in one msgspec call: (texts per key, rows); None when any line is
    blank, bad or possibly too long, for _parse_lines to sort out."""
    if len(chunk.lines) > max_line_bytes:
        return None
    try:
        records = _record_decoder(tuple(keys)).decode_lines(chunk.lines)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if len(records) != chunk.lines.count(b"\n"):  # blank lines were passed over: rows would not line up
        return None
    fields = [f"field{i}" for i in range(len(keys))]
    texts = {key: [getattr(record, name) for record in records] for key, name in zip(keys, fields, strict=True)}
    return texts, chunk.first_row + np.arange(len(records), dtype=np.int64)


def _parse_lines(chunk: Chunk, keys: list[str], skipped: Counter,
                 max_line_bytes: int) -> tuple[dict[str, list[str]], np.ndarray, str | None]:
    """JSON lines -> (texts per key, their rows, the first error); a bad record (or a line longer than max_line_bytes,
    not parsed) is counted and left out."""
    fast = _parse_lines_fast(chunk, keys, max_line_bytes)
    if fast is not None:
        return *fast, None
    texts: dict[str, list[str]] = {key: [] for key in keys}
    rows = []
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
        rows.append(chunk.first_row + offset)
    return texts, np.array(rows, dtype=np.int64), first_error


def _check_ids(chunk: Chunk, key: str, documents: Documents, vocab_size: int,
               skipped: Counter) -> tuple[Documents, str | None]:
    """Drop documents holding ids outside [0, vocab); report the first one by row."""
    ids, lengths = documents.ids, documents.lengths
    if not len(ids) or (ids.min() >= 0 and ids.max() < vocab_size):  # two reductions, no temporaries
        return documents, None
    bad_token = (ids < 0) | (ids >= vocab_size)
    bad_docs = np.unique(np.repeat(np.arange(len(lengths)), lengths)[bad_token])
    skipped["token id outside the vocabulary"] += len(bad_docs)
    error = (f"{chunk.source}:{int(documents.rows[bad_docs[0]])}: token id {int(ids[bad_token][0])} in column "
             f"'{key}' is outside the vocabulary [0, {vocab_size})")
    kept = np.ones(len(lengths), bool)
    kept[bad_docs] = False
    return documents.keep(kept), error


def _encode_texts(chunk: Chunk, key: str, values: list, rows: np.ndarray,
                  skipped: Counter) -> tuple[Documents, str | None]:
    """A column of texts (non-strings are bad records: parquet and HF columns are not typed as str) -> Documents."""
    error = None
    kept = np.fromiter((isinstance(text, str) for text in values), dtype=bool, count=len(values))
    if not kept.all():
        skipped["value is not a string"] += int((~kept).sum())
        error = f"{chunk.source}:{int(rows[np.argmin(kept)])}: column '{key}' value is not a string"
        values, rows = [text for text in values if isinstance(text, str)], rows[kept]
    return Documents(*_worker_tokenizer.encode_batch(values), rows), error


def _rows_in(chunk: Chunk) -> int:
    """Records in a chunk of texts or token ids (JSON lines are counted as they are parsed)."""
    for values in (chunk.texts or {}).values():
        return len(values)
    for _, lengths in (chunk.token_ids or {}).values():
        return len(lengths)
    return 0


def process_chunk(chunk: Chunk, keys: list[str], append_eod: bool, eod_id: int | None, vocab_size: int,
                  dtype: type, max_line_bytes: int = MAX_DOCUMENT_BYTES) -> ChunkResult:
    """One chunk -> its documents per key (ids in `dtype`, lengths, rows), empty documents dropped, EOD appended."""
    skipped: Counter = Counter()
    error = None
    texts, rows = chunk.texts or {}, chunk.first_row + np.arange(_rows_in(chunk), dtype=np.int64)
    if chunk.lines is not None:
        texts, rows, error = _parse_lines(chunk, keys, skipped, max_line_bytes)
    if chunk.dropped is not None:  # a line the reader let go unread (too long): a bad record like the others
        skipped[chunk.dropped] += 1
        error = f"{chunk.source}:{chunk.first_row}: {chunk.dropped}"
    out: dict[str, Documents] = {}
    for key, values in texts.items():
        out[key], text_error = _encode_texts(chunk, key, values, rows, skipped)
        error = error or text_error
    for key, (ids, lengths) in (chunk.token_ids or {}).items():
        out[key], id_error = _check_ids(chunk, key, Documents(ids, lengths, rows), vocab_size, skipped)
        error = error or id_error
    for key, documents in out.items():
        empty = documents.lengths == 0
        if empty.any():
            skipped[f"empty document ({key})"] += int(empty.sum())
            documents = documents.keep(~empty)
        ids, lengths = documents.ids, documents.lengths
        if append_eod:
            ids, lengths = np.insert(ids, np.cumsum(lengths), eod_id), lengths + 1
        out[key] = Documents(ids.astype(dtype, copy=False), lengths, documents.rows)
    return ChunkResult(out, skipped, error, len(rows), chunk.num_bytes)


# ---- main side ---------------------------------------------------------------------------------------
def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _part_prefix(parts_dir: Path, index: int, source: str, key: str, options: PreprocessOptions) -> Path:
    identity = json.dumps([*source_identity(source), key, options.tokenizer_model, options.append_eod,
                           options.skip_bad_records])
    digest = hashlib.sha1(identity.encode()).hexdigest()[:12]
    return parts_dir / f"{index:05d}-{Path(source).name}-{key}-{digest}"


def _is_complete(prefix: Path) -> bool:
    try:
        IndexedDataset(prefix)
    except DataError:
        return False
    return has_document_sources(prefix)


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
    if options.workers > 1 and tokenizer is not None:
        # Workers use the encoder the main process chose, so an `auto` choice cannot differ between them.
        worker_args = (options.tokenizer_model, options.tokenizer_type, tokenizer.backend, 1)
        pool = multiprocessing.get_context("spawn").Pool(options.workers, _init_worker, worker_args)
    else:
        _encode_here(tokenizer)
    sizes = {source: source_size(source) for source in sources}
    tally = Tally(tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="preprocess", dynamic_ncols=True,
                       miniters=1, mininterval=1.0))
    build = _Build(options, dtype, eod_id, vocab_size)
    outputs = {key: output_prefix_for(options.output_prefix, key) for key in options.json_keys}
    try:
        if tokenizer is None:  # token ids: as fast to read again as to copy, so no parts to resume from
            build.write(sources, outputs, pool, tally,
                        before_finalize=lambda counts: _before_writing_outputs(counts, outputs, options, tally))
        else:
            _build_parts_and_merge(sources, sizes, build, outputs, pool, tally)
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
    """Refuse input that gave no documents (training would only blame the split) unless allow_no_documents, then
    drop the outputs' old records: a record must never describe data it was not written with."""
    for key, count in documents.items():
        if count == 0 and not options.allow_no_documents:
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


class _PrefixWriter:
    """One prefix's tokens (.bin/.idx) and document sources, written side by side and finished or dropped together
    (atomic: nothing appears under the prefix's names until finalize)."""

    def __init__(self, prefix: str | Path, dtype: type) -> None:
        self.data = IndexedDatasetWriter(prefix, dtype)
        self.sources = DocumentSourcesWriter(prefix)

    def add(self, source: str, documents: Documents) -> None:
        self.data.add_documents(documents.ids, documents.lengths)
        self.sources.add(source, documents.rows)

    def finalize(self) -> None:
        self.data.finalize()
        self.sources.finalize()

    def abort(self) -> None:
        self.data.abort()
        self.sources.abort()


@dataclass
class _Build:
    """What writing any source needs besides the source: handed whole to a worker that builds parts itself."""

    options: PreprocessOptions
    dtype: type
    eod_id: int | None
    vocab_size: int

    def write(self, sources: list[str], prefixes: dict[str, str | Path], pool: multiprocessing.pool.Pool | None,
              tally: Tally, before_finalize: Callable[[dict[str, int]], None] | None = None) -> None:
        """`sources`, in order, into one writer per key (atomic: nothing appears under `prefixes` unless all
        succeed). before_finalize gets the documents per key and may refuse them (raise) before anything is renamed
        into place."""
        writers = {key: _PrefixWriter(prefix, self.dtype) for key, prefix in prefixes.items()}
        try:
            for source in sources:
                self._write_source(source, writers, pool, tally)
            if before_finalize is not None:
                before_finalize({key: writer.data.num_documents for key, writer in writers.items()})
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        for writer in writers.values():
            writer.finalize()

    def write_part(self, source: str, prefixes: dict[str, Path]) -> Tally:
        """In a worker: one whole source into its part, read, encoded and written here; what it counted."""
        tally = Tally()
        self.write([source], prefixes, None, tally)
        return tally

    def _write_source(self, source: str, writers: dict[str, _PrefixWriter], pool: multiprocessing.pool.Pool | None,
                      tally: Tally) -> None:
        """Chunks read here, encoded here (pool None) or by the pool, written here in order."""
        options = self.options
        args = (options.json_keys, options.append_eod, self.eod_id, self.vocab_size, self.dtype,
                options.max_document_bytes)
        in_flight: deque = deque()

        def consume(result: ChunkResult) -> None:
            if result.error and not options.skip_bad_records:
                raise DataError(f"{result.error} (fix the record, or pass --skip-bad-records to count and skip it)")
            for key, documents in result.documents.items():
                writers[key].add(source, documents)
                tally.see_ids(key, documents.ids)
                tally.totals["tokens"] += len(documents.ids)
            tally.skipped.update(result.skipped)
            tally.totals["documents_in"] += result.documents_in
            tally.advance(result.num_bytes)

        for chunk in read_chunks(source, options.json_keys, options.hf_split, options.max_document_bytes):
            if pool is None:
                consume(process_chunk(chunk, *args))
                continue
            in_flight.append(pool.apply_async(process_chunk, (chunk, *args)))
            while len(in_flight) >= 2 * options.workers:
                consume(in_flight.popleft().get())
        while in_flight:
            consume(in_flight.popleft().get())


def _write_part(task: tuple[_Build, str, dict[str, Path]]) -> tuple[str, Tally]:
    build, source, prefixes = task
    return source, build.write_part(source, prefixes)


def _workers_read_whole_sources(sizes: dict[str, int], workers: int) -> bool:
    """Whether each worker should take whole sources: only when no source is larger than an even share of the
    work (else the largest one would leave the other workers idle), and every source can be opened by name in
    another process."""
    return (len(sizes) >= workers and max(sizes.values()) * workers <= sum(sizes.values())
            and not any(is_process_local(source) for source in sizes))


def _build_parts_and_merge(sources: list[str], sizes: dict[str, int], build: _Build, outputs: dict[str, str],
                           pool: multiprocessing.pool.Pool | None, tally: Tally) -> None:
    """Each source into its own part under {output_prefix}.parts/ (a re-run skips the finished ones), then the
    parts merged in source order; parts without a document between them are removed and refused (unless
    allow_no_documents)."""
    options = build.options
    parts_dir = Path(f"{options.output_prefix}.parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    part_prefixes: dict[str, list[Path]] = {key: [] for key in options.json_keys}
    todo: dict[str, dict[str, Path]] = {}
    for index, source in enumerate(sources):
        prefixes = {key: _part_prefix(parts_dir, index, source, key, options) for key in options.json_keys}
        for key in options.json_keys:
            part_prefixes[key].append(prefixes[key])
        if not all(_is_complete(prefix) for prefix in prefixes.values()):
            todo[source] = prefixes
            continue
        resumed = Tally(totals=Counter({"resumed files": 1}))
        for key, prefix in prefixes.items():  # written by an earlier run: its ids were not seen in this one
            resumed.max_ids[key] = max_token_id(prefix)
        tally.add(resumed, sizes[source])
    todo_sizes = {source: sizes[source] for source in todo}
    if todo and pool is not None and _workers_read_whole_sources(todo_sizes, options.workers):
        largest_first = sorted(todo, key=todo_sizes.__getitem__, reverse=True)
        tasks = [(build, source, todo[source]) for source in largest_first]
        for source, part_tally in pool.imap_unordered(_write_part, tasks):
            tally.add(part_tally, todo_sizes[source])
    else:
        for source, prefixes in todo.items():
            build.write([source], prefixes, pool, tally)
    try:
        _before_writing_outputs({key: sum(len(IndexedDataset(prefix)) for prefix in prefixes)
                                 for key, prefixes in part_prefixes.items()}, outputs, options, tally)
    except DataError:
        shutil.rmtree(parts_dir)  # empty parts: nothing worth resuming from
        raise
    for key, prefixes in part_prefixes.items():
        merge_prefixes(prefixes, outputs[key], options.workers)
    shutil.rmtree(parts_dir)
