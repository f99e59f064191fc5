"""Where each document of a .bin/.idx prefix came from: its source file and 1-based line (or parquet / HF row).

Two files beside `PREFIX.bin` / `PREFIX.idx` (not to be confused with `PREFIX.megapico.json`, provenance.py's
record of the tokenizer the whole prefix was built with):
- `PREFIX.sources.json`: {"format": 1, "documents": N, "sources": ["data/a.json.gz", ...]}, the sources in the order
  of their first document, each once;
- `PREFIX.sources.bin`: one little-endian uint64 per document, in document order: source index << 40 | row
  (8 bytes a document; up to 2**24 sources and rows below 2**40).
Because sources are numbered in order of first appearance, the files depend only on the documents' (source, row)
sequence: merging prefixes gives the bytes one write of the same documents would, so a distributed build equals a
single-machine one byte for byte.

Writing streams the entries to disk (memory holds only the source list), under new random temporary names that
finalize renames into place (any old header removed first): a link planted at a final name is replaced, never
written through, and a header under the final name always describes the entries beside it. Reading treats the
files as received data: the header is capped in size and type-checked, the entries' size must be the header's
count, the count must be the .idx's, and every entry must name a listed source and a row >= 1 (one chunked,
vectorised pass); anything else is a one-line DataError naming the file and the fix.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from megapico.data.indexed_dataset import DataError, IndexedDataset

FORMAT = 1
ROW_BITS = 40
MAX_SOURCES = 1 << (64 - ROW_BITS)
MAX_ROW = (1 << ROW_BITS) - 1
MAX_HEADER_BYTES = 64 << 20  # a million 64-character paths; a header is read whole, so it is capped
_CHUNK = 1 << 22  # entries per chunk when checking or merging (32 MB)
_ENTRY = np.dtype("<u8")
REBUILD = "rebuild the prefix with tools/preprocess_data.py"


def document_sources_paths(prefix: str | Path) -> tuple[Path, Path]:
    """(header, entries) of a prefix: PREFIX.sources.json, PREFIX.sources.bin."""
    return Path(f"{prefix}.sources.json"), Path(f"{prefix}.sources.bin")


def has_document_sources(prefix: str | Path) -> bool:
    return all(path.is_file() for path in document_sources_paths(prefix))


def _temporary(path: Path) -> tuple[int, Path]:
    """A new file under a random sibling name, with a plain new file's permissions (mkstemp's are 0o600)."""
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(descriptor, 0o666 & ~mask)
    return descriptor, Path(name)


class DocumentSourcesWriter:
    """Streams (source, row) per document into PREFIX.sources.{json,bin}, in the order documents are appended to the
    prefix's IndexedDatasetWriter. As a context manager: leaving it normally finalises, an exception aborts."""

    def __init__(self, prefix: str | Path) -> None:
        self.header_path, self.entries_path = document_sources_paths(prefix)
        self.header_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, self._tmp_entries = _temporary(self.entries_path)
        self._entries = os.fdopen(descriptor, "wb")
        self._tmp_header: Path | None = None
        self._index: dict[str, int] = {}  # source -> its number, in order of first appearance
        self.num_documents = 0

    def add(self, source: str, rows: np.ndarray) -> None:
        """One entry per document appended from `source`: `rows` are their 1-based lines (or rows), in order."""
        rows = np.asarray(rows)
        self._add_indexed([source], np.zeros(len(rows), dtype=np.int64), rows)

    def _add_indexed(self, sources: list[str], source_indices: np.ndarray, rows: np.ndarray) -> None:
        """Entries given as indices into `sources` (a part's own list, when merging) and rows. Sources new to this
        output are numbered in the order they first appear, so the bytes do not depend on how documents arrive."""
        if not len(rows):
            return
        if rows.ndim != 1 or rows.dtype.kind not in "iu" or len(source_indices) != len(rows):
            raise ValueError("rows must be a 1-D integer array, one per document")
        if int(rows.min()) < 1 or int(rows.max()) > MAX_ROW:
            bad = int(rows[(rows < 1) | (rows > MAX_ROW)][0])
            raise DataError(f"{sources[int(source_indices[0])]}: row {bad} is outside 1..{MAX_ROW} (rows are 1-based "
                            f"line or row numbers)")
        present, first = np.unique(source_indices, return_index=True)
        for local in present[np.argsort(first)]:
            self._index.setdefault(sources[local], len(self._index))
        if len(self._index) > MAX_SOURCES:
            raise DataError(f"{self.header_path}: more than {MAX_SOURCES:,} sources; merge the input files into fewer")
        numbers = np.zeros(int(present[-1]) + 1, dtype=np.uint64)
        numbers[present] = [self._index[sources[local]] for local in present]
        entries = (numbers[source_indices] << np.uint64(ROW_BITS)) | rows.astype(np.uint64)
        self._entries.write(memoryview(np.ascontiguousarray(entries, dtype=_ENTRY)))
        self.num_documents += len(rows)

    def finalize(self) -> None:
        self._entries.flush()
        os.fsync(self._entries.fileno())
        self._entries.close()
        header = json.dumps({"format": FORMAT, "documents": self.num_documents, "sources": list(self._index)},
                            indent=1) + "\n"
        if len(header.encode()) > MAX_HEADER_BYTES:
            self.abort()
            raise DataError(f"{self.header_path}: the list of {len(self._index):,} sources exceeds the "
                            f"{MAX_HEADER_BYTES >> 20} MiB a header may hold; merge the input files into fewer")
        descriptor, self._tmp_header = _temporary(self.header_path)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(header)
            handle.flush()
            os.fsync(handle.fileno())
        self.header_path.unlink(missing_ok=True)  # never pair an old header with new entries
        os.replace(self._tmp_entries, self.entries_path)
        os.replace(self._tmp_header, self.header_path)

    def abort(self) -> None:
        self._entries.close()
        for path in (self._tmp_entries, self._tmp_header):
            if path is not None:
                path.unlink(missing_ok=True)

    def __enter__(self) -> "DocumentSourcesWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class DocumentSources:
    """The checked document sources of one prefix (read_document_sources): document i came from
    sources[source index] at 1-based line or row `row`."""

    def __init__(self, prefix: str | Path, sources: list[str], entries: np.ndarray) -> None:
        self.prefix, self.sources, self._entries = Path(prefix), sources, entries

    def __len__(self) -> int:
        return len(self._entries)

    def locate(self, documents: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        """(source indices into .sources, rows) of many documents at once."""
        entries = self._entries[documents]
        return (entries >> np.uint64(ROW_BITS)).astype(np.int64), (entries & np.uint64(MAX_ROW)).astype(np.int64)

    def source_of(self, document: int) -> tuple[str, int]:
        """(source, 1-based row) of one document."""
        source, row = self.locate(np.array([document]))
        return self.sources[int(source[0])], int(row[0])


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_HEADER_BYTES + 1)
    except OSError as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}); {REBUILD}") from None
    if len(text) > MAX_HEADER_BYTES:
        raise DataError(f"{path}: larger than the {MAX_HEADER_BYTES >> 20} MiB a document-sources header may hold "
                        f"(not one megapico wrote); {REBUILD}")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise DataError(f"{path}: not JSON ({type(err).__name__}); {REBUILD}") from None
    sources = header.get("sources") if isinstance(header, dict) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT or type(header.get("documents")) is not int \
            or header["documents"] < 0 or not isinstance(sources, list) \
            or not all(isinstance(source, str) for source in sources):
        raise DataError(f"{path}: not a document-sources header of format {FORMAT}; {REBUILD}")
    if len(set(sources)) != len(sources) or len(sources) > MAX_SOURCES:
        raise DataError(f"{path}: its sources repeat or exceed {MAX_SOURCES:,} (not one megapico wrote); {REBUILD}")
    return header


def read_document_sources(prefix: str | Path) -> DocumentSources:
    """The prefix's document sources, checked against its .idx; a one-line DataError when it has none (data built by
    Megatron-LM or an older megapico) or when they do not fit."""
    header_path, entries_path = document_sources_paths(prefix)
    for path in (header_path, entries_path):
        if not path.is_file():
            raise DataError(f"{path}: missing, so {prefix} has no per-document sources (data built by Megatron-LM or "
                            f"an older megapico has none); {REBUILD} to trace its documents")
    header = _read_header(header_path)
    count = header["documents"]
    size = entries_path.stat().st_size
    if size != count * _ENTRY.itemsize:
        raise DataError(f"{entries_path}: {size} bytes, but {header_path} counts {count} documents of "
                        f"{_ENTRY.itemsize} bytes (truncated or not this header's); {REBUILD}")
    indexed = IndexedDataset(prefix)
    if count != len(indexed):
        raise DataError(f"{header_path}: {count:,} documents, but {indexed.idx_path} holds {len(indexed):,}: these "
                        f"sources are not this data's; {REBUILD}")
    entries = np.memmap(entries_path, mode="r", dtype=_ENTRY) if count else np.empty(0, _ENTRY)
    sources = DocumentSources(prefix, header["sources"], entries)
    for start in range(0, count, _CHUNK):
        source_indices, rows = sources.locate(slice(start, start + _CHUNK))
        if source_indices.max() >= len(header["sources"]) or rows.min() < 1:
            at = start + int(np.argmax((source_indices >= len(header["sources"])) | (rows < 1)))
            raise DataError(f"{entries_path}: document {at} names source {int(source_indices[at - start])} of "
                            f"{len(header['sources'])} and row {int(rows[at - start])} (corrupt); {REBUILD}")
    return sources


def merge_document_sources(prefixes: list[str | Path], output_prefix: str | Path) -> None:
    """The document sources of the concatenation of `prefixes`, in the order given (beside their merged .bin/.idx):
    byte-identical to one write of the same documents. A prefix without them is refused, naming it."""
    if not prefixes:
        raise DataError("nothing to merge: no input prefixes")
    parts = [read_document_sources(prefix) for prefix in prefixes]
    with DocumentSourcesWriter(output_prefix) as writer:
        for part in parts:
            for start in range(0, len(part), _CHUNK):
                writer._add_indexed(part.sources, *part.locate(slice(start, start + _CHUNK)))
