"""Input discovery and chunked reading for preprocessing.

A source is one input file (or one HF dataset): a local path, or an fsspec URL (`s3://`, `hf://datasets/...`,
`file://`, `memory://`, ...) that is streamed (opened in binary mode, decompressed and parsed as it is read, never
downloaded whole first); local paths skip fsspec. Reading yields chunks, the unit of work a tokenizer worker
receives: raw bytes of whole JSON lines (decoded and parsed in the worker, not here), a list of texts (parquet text
column, HF dataset), or already tokenized ids as a flat numpy array plus lengths (parquet `input_ids`-style list
column: no tokenizer runs).
"""

import glob
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from isal import igzip

from megapico.data.indexed_dataset import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".json.gz", ".jsonl.gz", ".jsonl.zst", ".json.zst")
SUFFIXES = (*JSON_SUFFIXES, ".parquet")
CHUNK_BYTES = 1 << 22
CHUNK_ROWS = 4096
# The longest JSON line read (--max-document-bytes). Dolma's longest documents (whole books, papers with their
# LaTeX) run to a few MB, so 64 MiB is far above any real one; yet a line is held whole while it is parsed and
# tokenized, 2 x workers chunks at a time, so the cap is what bounds memory against one line with no end (a 32 KB
# .jsonl.zst can hold a 1 GiB line).
MAX_DOCUMENT_BYTES = 64 << 20
# fs.info keys (lower case, no underscores) that change when a remote file is rewritten: local and memory mtime or
# created, S3's ETag and LastModified, HF's blob id / last_commit
VERSION_KEYS = ("mtime", "created", "etag", "lastmodified", "blobid", "lastcommit")


@dataclass
class Chunk:
    """A piece of one source. Exactly one of lines / texts / token_ids is set."""

    source: str
    first_row: int  # 1-based line (JSON) or row (parquet / HF) number, for error messages
    num_bytes: int  # input bytes this chunk accounts for (progress)
    lines: bytes | None = None
    texts: dict[str, list] | None = None
    token_ids: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    dropped: str | None = None  # with lines=b"": why the line at first_row was read past and not kept


def too_long(max_bytes: int) -> str:
    """The reason a JSON line over the cap is refused (or, with --skip-bad-records, counted and skipped)."""
    return f"a line longer than {max_bytes:,} bytes (raise --max-document-bytes to read it)"


def is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def hub_cache_snapshot(path: Path) -> Path | None:
    """A HF hub cache folder of one repository (datasets--ORG--NAME with refs/, snapshots/, blobs/) -> the snapshot
    refs/main names, or its only one; None for any other directory."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return None
    main = path / "refs" / "main"
    revision = main.read_text().strip() if main.is_file() else ""
    if revision and ("/" in revision or "\\" in revision or revision in (".", "..")):
        raise DataError(f"{main}: names revision '{revision[:80]}', which is not a snapshot's name; refusing to "
                        f"follow it (pass the snapshot to read, {path}/snapshots/REVISION)")
    if revision and (snapshots / revision).is_dir():
        return snapshots / revision
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) != 1:
        raise DataError(f"{path}: a HF cache folder with {len(found)} snapshots and no refs/main; pass the one to "
                        f"read ({path}/snapshots/REVISION)")
    return found[0]


def is_url(source: str) -> bool:
    return "://" in source


def _url_fs(url: str):  # noqa: ANN202 (fsspec's AbstractFileSystem, imported only for URLs)
    import fsspec

    return fsspec.core.url_to_fs(url)


def is_process_local(source: str) -> bool:
    """A source only this process can read (fsspec's memory:// lives in the process that wrote it), so worker
    processes must be handed its bytes rather than its name."""
    from fsspec.implementations.memory import MemoryFileSystem

    return is_url(source) and isinstance(_url_fs(source)[0], MemoryFileSystem)


def _discover_urls(url: str) -> list[str]:
    """An fsspec URL of a file, a directory (every supported file below it) or a glob -> URLs in name order."""
    fs, path = _url_fs(url)
    if fs.isfile(path):
        return [url]
    found = fs.find(path, detail=True) if fs.isdir(path) else fs.glob(path, detail=True)  # no request per file
    return sorted(fs.unstrip_protocol(name) for name, info in found.items()
                  if info["type"] == "file" and name.endswith(SUFFIXES))


def discover_sources(input_spec: str) -> list[str]:
    """A file, a directory (Dolma's documents/*.json.gz, a download of pico-lm/pretokenized-dolma with
    data/train-*.parquet, any supported files below it), a HF hub cache folder (its snapshot), a saved HF dataset
    or a glob, as a local path or an fsspec URL -> the sources in name order (pico-train's file order)."""
    if is_url(input_spec):
        try:
            files = _discover_urls(input_spec)
        except Exception as err:  # no such bucket, no credentials, unknown protocol: name the URL
            raise DataError(f"{input_spec}: cannot list it ({type(err).__name__}: {_first_line(err)})") from None
        if not files:
            raise DataError(f"{input_spec}: no input found (want .jsonl/.json.gz/.jsonl.zst/.parquet files at or "
                            f"below this URL, or a glob matching them)")
        return files
    path = Path(input_spec)
    if path.is_dir():
        path = hub_cache_snapshot(path) or path
    if is_saved_hf_dataset(path):
        check_saved_dataset(path)  # before anything is written; _hf_chunks checks again where it reads
        return [str(path)]
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and str(p).endswith(SUFFIXES))
    else:
        files = sorted(p for p in glob.glob(input_spec, recursive=True) if p.endswith(SUFFIXES))
    if not files:
        raise DataError(f"{input_spec}: no input found (want a .jsonl/.json.gz/.jsonl.zst/.parquet file, a directory "
                        f"of them such as Dolma's documents/, a glob, or a saved HF dataset)")
    return files


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else ""


def source_size(source: str) -> int:
    """Bytes of a source file (0 for a saved HF dataset's folder), for progress."""
    if is_url(source):
        fs, path = _url_fs(source)
        return int(fs.size(path) or 0)
    return Path(source).stat().st_size if Path(source).is_file() else 0


def source_identity(source: str) -> list:
    """What tells a source from a changed one, for resuming: the resolved path, size and mtime of a local file;
    a URL's size and whichever of mtime, ETag or last-modified its filesystem reports."""
    if not is_url(source):
        stat = Path(source).stat()
        return [os.path.abspath(source), stat.st_size, stat.st_mtime_ns]
    fs, path = _url_fs(source)
    info = fs.info(path)
    versions = [str(info[key]) for key in sorted(info) if key.lower().replace("_", "") in VERSION_KEYS]
    return [source, info.get("size"), *versions]


def _open_binary(source: str) -> io.IOBase:
    if not is_url(source):
        return open(source, "rb")
    fs, path = _url_fs(source)
    return fs.open(path, "rb")


def _open_json_stream(path: str) -> tuple[io.IOBase, io.IOBase]:
    raw = _open_binary(path)
    if path.endswith(".gz"):
        return raw, igzip.GzipFile(fileobj=raw)  # ISA-L inflate, 3x zlib: gunzip is the largest cost after encoding
    if path.endswith(".zst"):
        import zstandard

        return raw, zstandard.ZstdDecompressor().stream_reader(raw)
    return raw, raw


def _json_chunks(path: str, max_line_bytes: int) -> Iterator[Chunk]:
    """Whole lines, about CHUNK_BYTES at a time, each ending in a newline (a last line without one gets it). The
    line being read is kept as a list of pieces, joined once when it ends, never re-concatenated per read (which made
    one 1 GiB line quadratic), and only up to max_line_bytes: a longer line is read on and let go, a Chunk with
    `dropped` standing for it, so memory stays flat whatever one line's length. (Lines that end within a chunk are
    measured exactly by the worker, encode_chunk._parse_lines.)"""
    raw, stream = _open_json_stream(path)
    with raw:
        pieces: list[bytes] = []  # the start of the line being read; no newline among them
        held, line_no, consumed, dropping = 0, 1, 0, False
        while True:
            block = stream.read(CHUNK_BYTES)
            at_end = not block
            if at_end:
                if not pieces:
                    return
                block = b"\n"
            if dropping:  # the rest of a line already past the cap, up to its newline
                end = block.find(b"\n")
                if end < 0:
                    continue
                block, line_no, dropping = block[end + 1:], line_no + 1, False
            cut = block.rfind(b"\n") + 1
            if cut:
                lines = b"".join((*pieces, block[:cut]))
                position = raw.tell()
                yield Chunk(path, line_no, position - consumed, lines=lines)
                consumed, line_no = position, line_no + lines.count(b"\n")
                pieces, held, block = [], 0, block[cut:]
            if block:
                pieces.append(block)
                held += len(block)
                if held > max_line_bytes:
                    position = raw.tell()
                    yield Chunk(path, line_no, position - consumed, lines=b"", dropped=too_long(max_line_bytes))
                    consumed, pieces, held, dropping = position, [], 0, True
            if at_end:
                return


def _arrow_chunk(path: str, first_row: int, num_bytes: int, batch, keys: list[str]) -> Chunk:  # noqa: ANN001
    """One record batch (parquet or a saved HF dataset) as a Chunk: list-of-integer columns become token ids
    (flat numpy + lengths, straight from the Arrow buffers), other columns texts."""
    import pyarrow as pa

    texts, token_ids = {}, {}
    for key in keys:
        column = batch.column(key)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            if not pa.types.is_integer(column.type.value_type):
                raise DataError(f"{path}: column '{key}' is a list of {column.type.value_type}, not token ids")
            offsets = column.offsets.to_numpy()
            ids = column.values.slice(offsets[0], offsets[-1] - offsets[0]).to_numpy()
            token_ids[key] = (ids, np.diff(offsets).astype(np.int64))  # ids in the file's integer type
        else:
            texts[key] = column.to_pylist()
    return Chunk(path, first_row, num_bytes, texts=texts or None, token_ids=token_ids or None)


def _parquet_chunks(path: str, keys: list[str]) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    with _open_binary(path) as handle:  # an fsspec file is read by ranges: the footer, then the row groups
        parquet = pq.ParquetFile(handle)
        missing = [key for key in keys if key not in parquet.schema_arrow.names]
        if missing:
            raise DataError(f"{path}: no column '{missing[0]}' (columns: {', '.join(parquet.schema_arrow.names)}); "
                            f"pick one with --json-keys")
        total, row = source_size(path), 1
        per_row = total / max(parquet.metadata.num_rows, 1)
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=keys):
            yield _arrow_chunk(path, row, int(per_row * batch.num_rows), batch, keys)
            row += batch.num_rows


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}); not a dataset saved with save_to_disk") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: not a JSON object; not a dataset saved with save_to_disk")
    return value


def check_saved_dataset(path: Path) -> None:
    """datasets.load_from_disk opens the split folders dataset_dict.json lists and the Arrow files each state.json
    lists, joined to the dataset's folder. The folder may be someone else's: a name that is absolute, climbs with
    '..' or resolves outside (a link) would feed other files into the output, so each must stay inside the folder."""
    root = path.resolve()

    def inside(name: object, directory: Path, source: Path) -> Path:
        target = directory / name if isinstance(name, str) and name else None
        resolved = target.resolve() if target is not None else None
        if target is None or Path(name).is_absolute() or ".." in Path(name).parts or (
                resolved != root and root not in resolved.parents):
            raise DataError(f"{source}: names '{str(name)[:80]}', which is outside the dataset's folder {path}; "
                            f"refusing to read it")
        return target

    listing = path / "dataset_dict.json"
    directories = [path]
    if listing.is_file():
        splits = _read_json(listing).get("splits")
        if not isinstance(splits, list):
            raise DataError(f"{listing}: no list of splits; not a DatasetDict saved with save_to_disk")
        directories = [inside(split, path, listing) for split in splits]
    for directory in directories:
        state = directory / "state.json"
        files = _read_json(state).get("_data_files")
        if not isinstance(files, list):
            raise DataError(f"{state}: no list of data files; not a dataset saved with save_to_disk")
        for entry in files:
            inside(entry.get("filename") if isinstance(entry, dict) else None, directory, state)


def _hf_chunks(path: str, keys: list[str], split: str) -> Iterator[Chunk]:
    import datasets

    check_saved_dataset(Path(path))
    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{path}: no split '{split}' (splits: {', '.join(dataset)}); pick one with --hf-split")
        dataset = dataset[split]
    missing = [key for key in keys if key not in dataset.column_names]
    if missing:
        raise DataError(f"{path}: no column '{missing[0]}' (columns: {', '.join(dataset.column_names)})")
    row = 1
    # Arrow record batches of the memory-mapped files, in row order: no Python lists of token ids
    for batch in dataset.select_columns(keys).with_format("arrow").iter(batch_size=CHUNK_ROWS):
        yield _arrow_chunk(path, row, 0, batch, keys)
        row += batch.num_rows


def read_chunks(source: str, keys: list[str], hf_split: str = "train",
                max_line_bytes: int = MAX_DOCUMENT_BYTES) -> Iterator[Chunk]:
    """Chunks of one source, in order; an unreadable source is a DataError naming it. JSON lines longer than
    max_line_bytes are not kept (see _json_chunks)."""
    try:
        if not is_url(source) and is_saved_hf_dataset(Path(source)):
            yield from _hf_chunks(source, keys, hf_split)
        elif source.endswith(".parquet"):
            yield from _parquet_chunks(source, keys)
        else:
            yield from _json_chunks(source, max_line_bytes)
    except DataError:
        raise
    except Exception as err:  # gzip/zstd/arrow/OS errors: name the file, not a traceback
        raise DataError(f"{source}: unreadable ({type(err).__name__}: {_first_line(err)})") from None
