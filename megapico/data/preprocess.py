"""Dolma (JSON lines, gz, zst, parquet, HF datasets; local paths or fsspec URLs) -> Megatron .bin/.idx, parallel
and streaming, at the speed of the tokenizer.

Work flows as chunks (readers.py) through encode_chunk.process_chunk: parse JSON (msgspec, keeping only the
--json-keys fields), validate, encode (tokenizer.py: tiktoken or HF's Rust batch API), and return numpy arrays per key:
ids in the output dtype, lengths, and each kept document's 1-based source line or row. At most 2 x workers chunks are in
flight, and a JSON line is held only up to --max-document-bytes (a longer one is a bad record), so memory stays flat
whatever the input. Who reads depends on the input, so that the main process stays nearly idle where it can:
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
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megapico.data.document_sources import DocumentSourcesWriter, has_document_sources
from megapico.data.encode_chunk import ChunkResult, Documents, encode_here, init_worker, process_chunk
from megapico.data.indexed_dataset import DataError, IndexedDataset, IndexedDatasetWriter, token_dtype
from megapico.data.merge import merge_prefixes, move_prefix
from megapico.data.provenance import data_record, max_token_id, remove_record, tokenizer_record, write_record
from megapico.data.readers import (
    MAX_DOCUMENT_BYTES,
    discover_sources,
    is_process_local,
    read_chunks,
    source_identity,
    source_size,
)
from megapico.data.tokenizer import load_tokenizer


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
        pool = multiprocessing.get_context("spawn").Pool(options.workers, init_worker, worker_args)
    else:
        encode_here(tokenizer)
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
        if len(prefixes) == 1:  # one source (each task of a build on many machines): its part is the output
            move_prefix(prefixes[0], outputs[key])
        else:
            merge_prefixes(prefixes, outputs[key], options.workers)
    shutil.rmtree(parts_dir)
