"""Preprocessing pretokenized-dolma parquet (--json-keys input_ids) against pyarrow alone reading the same files.

Writes --files parquet files of --rows rows of 2049 token ids (pico-lm/pretokenized-dolma's layout, random ids),
then measures, in this order, each once: pyarrow decoding every file's input_ids into one numpy array per record
batch (the least any reader must do), and tools/preprocess_data.py's preprocess() writing the .bin/.idx (timed in
a child process around the call, so interpreter start and imports are left out; with fsync of the outputs).
Prints tokens per second of both, their ratio, and the child's peak RSS.
    python benchmarks/bench_pretokenized.py --files 8 --rows 2048
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROW = 2049
CHILD = """
import sys, time
from megapico.data.preprocess import PreprocessOptions, preprocess
started = time.perf_counter()
preprocess(PreprocessOptions(input=sys.argv[1], output_prefix=sys.argv[2], json_keys=["input_ids"], vocab_size=50304))
print(time.perf_counter() - started)
"""


def write_files(directory: Path, files: int, rows: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (directory / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(files):
        ids = rng.integers(0, 50280, rows * ROW, dtype=np.int32)
        offsets = np.arange(0, len(ids) + 1, ROW, dtype=np.int32)
        pq.write_table(pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                                 "idx": np.arange(index * rows, (index + 1) * rows)}),
                       directory / "data" / f"train-{index:05d}-of-{files:05d}.parquet")
    return files * rows * ROW


def pyarrow_read(directory: Path) -> float:
    import pyarrow.parquet as pq

    started, total = time.perf_counter(), 0
    for path in sorted((directory / "data").iterdir()):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=["input_ids"]):
            total += len(batch.column(0).values.to_numpy())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "pretokenized-dolma"
        tokens = write_files(directory, args.files, args.rows)
        arrow_seconds = pyarrow_read(directory)
        out = subprocess.run([sys.executable, "-c", CHILD, str(directory), f"{tmp}/rows"], check=True,
                             capture_output=True, text=True)
        ours_seconds = float(out.stdout.split()[-1])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
        size = sum(p.stat().st_size for p in (directory / "data").iterdir()) / 2**20
    print(f"{args.files} files x {args.rows} rows x {ROW} tokens = {tokens:,} tokens ({size:,.0f} MiB of parquet)")
    print(f"pyarrow alone (decode input_ids): {arrow_seconds:.2f} s, {tokens / arrow_seconds / 1e6:.1f} M tokens/s")
    print(f"megapico preprocess(): {ours_seconds:.2f} s, "
          f"{tokens / ours_seconds / 1e6:.1f} M tokens/s = {arrow_seconds / ours_seconds:.2f}x pyarrow's rate; "
          f"peak RSS {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
