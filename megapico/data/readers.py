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


def discover_sources(input_spec: str) -> list[str]:
    """A file, a directory (Dolma's documents/*.json.gz, or any supported files below it), a saved HF dataset
    or a glob -> the sorted list of sources."""
    path = Path(input_spec)
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


def _parquet_chunks(path: str, keys: list[str]) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    missing = [key for key in keys if key not in parquet.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: no column '{missing[0]}' (columns: {', '.join(parquet.schema_arrow.names)}); "
                        f"pick one with --json-keys")
    total, row = Path(path).stat().st_size, 1
    per_batch = total / max(parquet.metadata.num_rows, 1)
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=keys):
        texts, token_ids = {}, {}
        for key in keys:
            column = batch.column(key)
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                if not pa.types.is_integer(column.type.value_type):
                    raise DataError(f"{path}: column '{key}' is a list of {column.type.value_type}, not token ids")
                offsets = column.offsets.to_numpy()
                token_ids[key] = (column.flatten().to_numpy().astype(np.int64), np.diff(offsets).astype(np.int64))
            else:
                texts[key] = column.to_pylist()
        yield Chunk(path, row, int(per_batch * batch.num_rows), texts=texts or None, token_ids=token_ids or None)
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
    for batch in dataset.iter(batch_size=CHUNK_ROWS):
        count = len(batch[keys[0]])
        yield Chunk(path, row, 0, texts={key: batch[key] for key in keys})
        row += count


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
