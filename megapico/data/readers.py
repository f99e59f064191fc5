"""Input discovery and chunked reading for preprocessing.

A source is one input file (or one HF dataset). Reading yields chunks, the unit of work a tokenizer
worker receives: raw bytes of whole JSON lines (decoded and parsed in the worker, not here), a list of
texts (parquet text column, HF dataset), or already tokenized ids as a flat numpy array plus lengths
(parquet `input_ids`-style list column: no tokenizer runs).
"""

import glob
import gzip
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megapico.data.indexed_dataset import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".json.gz", ".jsonl.gz", ".jsonl.zst", ".json.zst")
SUFFIXES = (*JSON_SUFFIXES, ".parquet")
CHUNK_BYTES = 1 << 22
CHUNK_ROWS = 4096


@dataclass
class Chunk:
    """A piece of one source. Exactly one of lines / texts / token_ids is set."""

    source: str
    first_row: int  # 1-based line (JSON) or row (parquet / HF) number, for error messages
    num_bytes: int  # input bytes this chunk accounts for (progress)
    lines: bytes | None = None
    texts: dict[str, list] | None = None
    token_ids: dict[str, tuple[np.ndarray, np.ndarray]] | None = None


def is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def hub_cache_snapshot(path: Path) -> Path | None:
    """A HF hub cache folder of one repository (datasets--ORG--NAME with refs/, snapshots/, blobs/) -> the snapshot
    refs/main names, or its only one; None for any other directory."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return None
    main = path / "refs" / "main"
    if main.is_file() and (snapshots / main.read_text().strip()).is_dir():
        return snapshots / main.read_text().strip()
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) != 1:
        raise DataError(f"{path}: a HF cache folder with {len(found)} snapshots and no refs/main; pass the one to "
                        f"read ({path}/snapshots/REVISION)")
    return found[0]


def discover_sources(input_spec: str) -> list[str]:
    """A file, a directory (Dolma's documents/*.json.gz, a download of pico-lm/pretokenized-dolma with
    data/train-*.parquet, any supported files below it), a HF hub cache folder (its snapshot), a saved HF dataset
    or a glob -> the sources in name order (pico-train's file order)."""
    path = Path(input_spec)
    if path.is_dir():
        path = hub_cache_snapshot(path) or path
    if is_saved_hf_dataset(path):
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


def _open_json_stream(path: str) -> tuple[io.RawIOBase, io.BufferedIOBase]:
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        import zstandard

        return raw, zstandard.ZstdDecompressor().stream_reader(raw)
    return raw, raw


def _json_chunks(path: str) -> Iterator[Chunk]:
    raw, stream = _open_json_stream(path)
    with raw:
        pending, line_no, consumed = b"", 1, 0
        while True:
            block = stream.read(CHUNK_BYTES)
            data = pending + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            if cut > 0:
                position = raw.tell()
                yield Chunk(path, line_no, position - consumed, lines=data[:cut])
                consumed = position
                line_no += data.count(b"\n", 0, cut)
            pending = data[cut:]
            if not block:
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

    parquet = pq.ParquetFile(path)
    missing = [key for key in keys if key not in parquet.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: no column '{missing[0]}' (columns: {', '.join(parquet.schema_arrow.names)}); "
                        f"pick one with --json-keys")
    total, row = Path(path).stat().st_size, 1
    per_row = total / max(parquet.metadata.num_rows, 1)
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=keys):
        yield _arrow_chunk(path, row, int(per_row * batch.num_rows), batch, keys)
        row += batch.num_rows


def _hf_chunks(path: str, keys: list[str], split: str) -> Iterator[Chunk]:
    import datasets

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


def read_chunks(source: str, keys: list[str], hf_split: str = "train") -> Iterator[Chunk]:
    """Chunks of one source, in order; an unreadable source is a DataError naming it."""
    try:
        if is_saved_hf_dataset(Path(source)):
            yield from _hf_chunks(source, keys, hf_split)
        elif source.endswith(".parquet"):
            yield from _parquet_chunks(source, keys)
        else:
            yield from _json_chunks(source)
    except DataError:
        raise
    except Exception as err:  # gzip/zstd/arrow/OS errors: name the file, not a traceback
        raise DataError(f"{source}: unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                        ) from None
