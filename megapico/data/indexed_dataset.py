"""Megatron-LM's binary indexed dataset (.bin tokens + .idx index), byte for byte.

.idx layout (little-endian): magic b"MMIDIDX\\x00\\x00", uint64 version 1, uint8 dtype code, uint64
sequence_count, uint64 document_count, int32 sequence_lengths[sequence_count], int64
sequence_pointers[sequence_count] (byte offsets into .bin), int64 document_indices[document_count].

The writer streams: tokens go straight to .bin and lengths to a side file, so memory stays flat whatever
the corpus size; the .idx is assembled from that side file in chunks at the end. Output appears atomically
(temporary names, fsync, rename .bin then .idx, any old .idx removed first), so a pair under the final
names is always complete. The reader memory-maps both files and validates them on open.
"""

import errno
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence_count, document_count
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                                7: np.float32, 8: np.uint16}
_CHUNK = 1 << 22  # entries per chunk when copying index arrays (16-32 MB)
_COPY_PIECE = 1 << 30  # bytes of .bin one merge thread copies at a time, so threads share out a few large files
# copy_file_range refused by the kernel (ENOSYS), across these filesystems (EXDEV) or by one of them
_NO_COPY_FILE_RANGE = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


class DataError(ValueError):
    """Bad data or a bad file; the message is one line naming the file and what is wrong."""


def check_vocabulary(ids: np.ndarray, vocab_size: int | None, prefix: str, document: int) -> None:
    """Every id of `document` (of the data at `prefix`) must fit the model's vocabulary. Checked where samples are
    read: a data record (.megapico.json) is the sender's word, and the start-up check reads no more than it (or,
    without one, the first 16M tokens), so an id past the vocabulary would otherwise reach the embedding."""
    if vocab_size is None or not len(ids) or (int(ids.max()) < vocab_size and int(ids.min()) >= 0):
        return
    outside = ids[(ids >= vocab_size) | (ids < 0)]
    raise DataError(f"{prefix}: document {document} holds token id {int(outside[0])}, outside the model's vocab_size "
                    f"{vocab_size} (whatever its .megapico.json record says); re-preprocess the data with the "
                    f"model's tokenizer")


def token_dtype(vocab_size: int) -> type:
    """Megatron's choice: uint16 when every id fits comfortably, int32 otherwise."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype: type) -> int:
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {dtype} has no Megatron dtype code")


def data_file_paths(prefix: str | Path) -> tuple[Path, Path]:
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


class IndexedDatasetWriter:
    """Streams documents (one sequence each, as Megatron's preprocess does) into `{prefix}.bin/.idx`.

    Use as a context manager: leaving it normally finalises atomically, an exception removes every
    temporary file and leaves whatever was under the final names untouched.
    """

    def __init__(self, prefix: str | Path, dtype: type) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.bin_path, self.idx_path = data_file_paths(self.prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = Path(str(self.bin_path) + suffix)
        self._tmp_idx = Path(str(self.idx_path) + suffix)
        self._tmp_lengths = Path(str(self.prefix) + ".lengths" + suffix)
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = open(self._tmp_lengths, "wb")
        self.num_documents = 0
        self.num_tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths (sum(lengths) == len(tokens))."""
        if int(lengths.sum()) != len(tokens):
            raise ValueError("lengths do not add up to the number of tokens")
        self._bin.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)))  # no bytes copy
        self._lengths.write(memoryview(np.ascontiguousarray(lengths, dtype=np.int32)))
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def add_document(self, tokens: np.ndarray) -> None:
        self.add_documents(np.asarray(tokens), np.array([len(tokens)], dtype=np.int32))

    def append_datasets(self, datasets: list["IndexedDataset"], workers: int = 1) -> None:
        """Append every document of existing datasets, in order (used to merge prefixes). Their .bin files are
        copied into place by copy_bins."""
        self._check_dtypes(datasets)
        self._bin.flush()
        start = self._bin.tell()
        end = start + sum(dataset.bin_path.stat().st_size for dataset in datasets)
        os.ftruncate(self._bin.fileno(), end)
        copy_bins([dataset.bin_path for dataset in datasets], self._bin.fileno(), start, workers)
        self._bin.seek(end)
        self._append_lengths(datasets)

    def adopt_bin(self, path: Path, datasets: list["IndexedDataset"]) -> None:
        """Take `path`, a temporary .bin that already holds exactly the tokens of `datasets` in order (copied there by
        the merge tasks of a build on many machines, build_tasks.py), as this writer's whole .bin, and append the
        datasets' documents to the index: the result is the bytes append_datasets gives, without copying the .bin
        again. The writer then owns `path`: finalize renames it into place, abort removes it."""
        self._check_dtypes(datasets)
        expected = sum(dataset.bin_path.stat().st_size for dataset in datasets)
        size = path.stat().st_size if path.is_file() else None
        if self.num_documents or size != expected:
            raise DataError(f"{path}: {size} bytes, not the {expected} of the datasets it should hold (or the writer "
                            f"already holds documents); merge again")
        self._bin.close()
        self._tmp_bin.unlink()
        self._tmp_bin = path
        self._bin = open(path, "ab")
        self._append_lengths(datasets)

    def _check_dtypes(self, datasets: list["IndexedDataset"]) -> None:
        for dataset in datasets:
            if dataset.dtype != self.dtype:
                raise DataError(f"{dataset.idx_path}: token dtype {dataset.dtype} differs from the output's "
                                f"{self.dtype}")

    def _append_lengths(self, datasets: list["IndexedDataset"]) -> None:
        for dataset in datasets:
            for first in range(0, len(dataset), _CHUNK):
                self._lengths.write(np.asarray(dataset.sequence_lengths[first:first + _CHUNK], np.int32).tobytes())
            self.num_documents += len(dataset)
            self.num_tokens += int(dataset.num_tokens)

    def _write_index(self) -> None:
        count = self.num_documents
        with open(self._tmp_idx, "wb") as idx, open(self._tmp_lengths, "rb") as lengths_file:
            idx.write(HEADER.pack(MAGIC, VERSION, dtype_code(self.dtype), count, count + 1))
            shutil.copyfileobj(lengths_file, idx, length=1 << 24)
            lengths_file.seek(0)
            offset = 0
            while chunk := lengths_file.read(4 * _CHUNK):
                lengths = np.frombuffer(chunk, dtype=np.int32).astype(np.int64) * self.dtype.itemsize
                ends = np.cumsum(lengths) + offset
                idx.write((ends - lengths).tobytes())
                offset = int(ends[-1])
            for start in range(0, count + 1, _CHUNK):
                idx.write(np.arange(start, min(start + _CHUNK, count + 1), dtype=np.int64).tobytes())

    def finalize(self) -> None:
        self._bin.close()
        self._lengths.close()
        self._write_index()
        _fsync(self._tmp_bin)
        _fsync(self._tmp_idx)
        self.idx_path.unlink(missing_ok=True)  # never pair an old .idx with a new .bin
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._tmp_lengths.unlink(missing_ok=True)

    def abort(self) -> None:
        self._bin.close()
        self._lengths.close()
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_lengths):
            path.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader of `{prefix}.bin/.idx`; validates magic, version, dtype and sizes on open."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self.bin_path, self.idx_path = data_file_paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(f"{path}: missing (build it with tools/preprocess_data.py, or fix the data path)")
        idx_size = self.idx_path.stat().st_size
        if idx_size < HEADER.size:
            raise DataError(f"{self.idx_path}: truncated index ({idx_size} bytes is shorter than the header)")
        with open(self.idx_path, "rb") as handle:
            magic, version, code, seq_count, doc_count = HEADER.unpack(handle.read(HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{self.idx_path}: not a Megatron .idx file (bad magic {magic[:9]!r})")
        if version != VERSION:
            raise DataError(f"{self.idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{self.idx_path}: unknown dtype code {code}")
        expected = HEADER.size + 12 * seq_count + 8 * doc_count
        if idx_size != expected:
            raise DataError(f"{self.idx_path}: {idx_size} bytes but {seq_count} sequences and {doc_count} document "
                            f"entries need {expected} (truncated or corrupt; rebuild it)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self._index = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        offset = HEADER.size
        self.sequence_lengths = np.frombuffer(self._index, np.int32, seq_count, offset)
        offset += 4 * seq_count
        self.sequence_pointers = np.frombuffer(self._index, np.int64, seq_count, offset)
        offset += 8 * seq_count
        self.document_indices = np.frombuffer(self._index, np.int64, doc_count, offset)
        if doc_count == 0 or self.document_indices[-1] != seq_count:
            raise DataError(f"{self.idx_path}: document indices do not end at the sequence count {seq_count}")
        bin_size = self.bin_path.stat().st_size
        need = 0 if seq_count == 0 else int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * \
            self.dtype.itemsize
        if bin_size != need:
            raise DataError(f"{self.bin_path}: {bin_size} bytes but its index describes {need} "
                            f"({'truncated' if bin_size < need else 'extra bytes'}; rebuild the pair)")
        self._bin = np.memmap(self.bin_path, mode="r", dtype=self.dtype) if bin_size else np.empty(0, self.dtype)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence `index` from `offset`, `length` of them (default: to its end)."""
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sequence_lengths[index]) - offset
        return self._bin[start:start + length]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def token_stream(self) -> np.ndarray:
        """Every token of the .bin in order (the sequences back to back, as the writer lays them): a memory map."""
        return self._bin

    def max_token_id(self, first_tokens: int = 1 << 24) -> int:
        """Largest id among the first `first_tokens` tokens (a bounded look; -1 when empty)."""
        head = self._bin[:first_tokens]
        return int(head.max()) if len(head) else -1


def _copy_block(source: int, output: int, count: int, offset: int, output_offset: int) -> int:
    """Up to `count` bytes from descriptor `source` at `offset` into `output` at `output_offset`; how many were copied
    (0 past the source's end). copy_file_range copies in the kernel, not through Python (on NFS 4.2, on the server);
    where the kernel or the pair of filesystems refuses it, a positional read and write."""
    try:
        return os.copy_file_range(source, output, count, offset, output_offset)
    except OSError as err:
        if err.errno not in _NO_COPY_FILE_RANGE:
            raise
    return os.pwrite(output, os.pread(source, min(count, 1 << 24), offset), output_offset)


def _copy_range(source: Path, offset: int, length: int, output_offset: int, output: int) -> None:
    """`length` bytes of the file `source` from `offset` into the descriptor `output` at `output_offset`."""
    with open(source, "rb") as handle:
        done = 0
        while done < length:
            copied = _copy_block(handle.fileno(), output, length - done, offset + done, output_offset + done)
            if copied == 0:
                raise DataError(f"{source}: shorter than {offset + length} bytes while merging (changed during the "
                                f"merge); merge again")
            done += copied


def copy_bins(paths: list[Path], output: int, start: int, workers: int = 1) -> int:
    """Copy the files `paths`, one after another, into the descriptor `output` from its byte `start` (the output
    already that long: ftruncate'd); returns the end. `workers` threads copy at once (no more than the cores: a copy
    from the page cache is CPU work), each range by the kernel (_copy_block), not through Python, in pieces of
    _COPY_PIECE so that threads share out a few large files. The output's other bytes are not touched: the merge
    tasks of a build on many machines each copy their range of one file this way."""
    pieces, offset = [], start  # (source, its offset, length, output offset)
    for path in paths:
        size = path.stat().st_size
        pieces += [(path, at, min(_COPY_PIECE, size - at), offset + at) for at in range(0, size, _COPY_PIECE)]
        offset += size
    with ThreadPoolExecutor(max(1, min(workers, os.cpu_count() or 1))) as pool:
        list(pool.map(lambda piece: _copy_range(*piece, output), pieces))
    return offset


def merge_datasets(prefixes: list[str | Path], output_prefix: str | Path, workers: int = 1,
                   copied_bin: Path | None = None) -> IndexedDataset:
    """Concatenate several prefixes (same dtype) into one, in the order given: the bytes one IndexedDatasetWriter
    writes for the same documents. `workers` threads copy the .bin ranges at once (worth it where the storage
    serves parallel streams, a parallel filesystem or NVMe; docs/data.md has the measurement). With `copied_bin`
    (a temporary .bin the merge tasks of a build on many machines filled), that file becomes the .bin and only the
    index is written (IndexedDatasetWriter.adopt_bin)."""
    datasets = [IndexedDataset(prefix) for prefix in prefixes]
    if not datasets:
        raise DataError("nothing to merge: no input prefixes")
    with IndexedDatasetWriter(output_prefix, datasets[0].dtype) as writer:
        if copied_bin is None:
            writer.append_datasets(datasets, workers)
        else:
            writer.adopt_bin(copied_bin, datasets)
    return IndexedDataset(output_prefix)
