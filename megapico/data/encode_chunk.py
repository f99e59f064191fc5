"""What a preprocessing worker does with one chunk (readers.Chunk): parse its JSON lines (msgspec, keeping only the
--json-keys fields; a chunk it refuses is parsed again line by line so a bad record is named exactly), validate,
encode (tokenizer.py) and return numpy arrays per key: ids in the output dtype, lengths, and each kept document's
1-based source line or row. The same code runs in a pool worker or, at --workers 1, in the main process
(preprocess.py decides where; this module holds no state but the process's tokenizer).
"""

import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import msgspec
import numpy as np

from megapico.data.readers import MAX_DOCUMENT_BYTES, Chunk, too_long
from megapico.data.tokenizer import Tokenizer, load_tokenizer


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


_worker_tokenizer: Tokenizer | None = None


def init_worker(tokenizer_model: str, tokenizer_type: str | None, backend: str, threads: int) -> None:
    """Load the tokenizer once per worker process. With several worker processes each gets one Rust thread, so the
    batch encoder's thread pool does not oversubscribe the cores the processes already fill."""
    global _worker_tokenizer
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    _worker_tokenizer = load_tokenizer(tokenizer_model, tokenizer_type, backend)


def encode_here(tokenizer: Tokenizer | None) -> None:
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
