"""Preprocessing pretokenized-dolma parquet (--json-keys input_ids) against pyarrow alone reading the same files.

Writes --files parquet files of --rows rows of 2049 token ids (pico-lm/pretokenized-dolma's layout: list<int32>
input_ids and an idx column, random ids), then one measuring process (the writer's memory stays out of its peak
RSS) imports both, runs each once untimed (lazy imports, allocator and thread-pool start-up, the page cache), and
times them alternately --repeats times: pyarrow decoding every file's input_ids into one numpy array per record
batch (the least any reader must do), and tools/preprocess_data.py's preprocess() writing the .bin/.idx (with
fsync of the outputs). Prints every run, the best of each, tokens per second, their ratio, and the measuring
process's peak RSS.
    python benchmarks/bench_pretokenized.py --files 8 --rows 4096 --repeats 5
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ROW = 2049


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


def measure(directory: Path, repeats: int) -> dict:
    """In this process: both readers warmed once, then timed alternately."""
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO))
    from megapico.data.preprocess import PreprocessOptions, preprocess

    def pyarrow_alone() -> int:
        total = 0
        for path in sorted((directory / "data").iterdir()):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=["input_ids"]):
                total += len(batch.column(0).values.to_numpy())
        return total

    def megapico() -> int:
        output = directory.parent / "out"
        summary = preprocess(PreprocessOptions(input=str(directory), output_prefix=str(output / "rows"),
                                               json_keys=["input_ids"], vocab_size=50304))
        shutil.rmtree(output)
        return summary["tokens"]

    runs: dict[str, list[float]] = {"pyarrow": [], "megapico": []}
    for repeat in range(repeats + 1):
        for name, run in (("pyarrow", pyarrow_alone), ("megapico", megapico)):
            started = time.perf_counter()
            run()
            if repeat:  # the first round only warms up
                runs[name].append(time.perf_counter() - started)
    return dict(runs=runs, peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the measuring process: a directory of files
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.repeats)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "pretokenized-dolma"
        tokens = write_files(directory, args.files, args.rows)
        size = sum(p.stat().st_size for p in (directory / "data").iterdir()) / 2**20
        out = subprocess.run([sys.executable, __file__, "--measure", str(directory), "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.splitlines()[-1])
    runs = result["runs"]
    arrow_seconds, ours_seconds = min(runs["pyarrow"]), min(runs["megapico"])
    print(f"{args.files} files x {args.rows} rows x {ROW} tokens = {tokens:,} tokens ({size:,.0f} MiB of parquet)")
    print(f"runs (s): pyarrow {' '.join(f'{t:.2f}' for t in runs['pyarrow'])}; "
          f"megapico {' '.join(f'{t:.2f}' for t in runs['megapico'])}")
    print(f"pyarrow alone (decode input_ids), best: {arrow_seconds:.2f} s, "
          f"{tokens / arrow_seconds / 1e6:.1f} M tokens/s")
    print(f"megapico preprocess(), best: {ours_seconds:.2f} s, {tokens / ours_seconds / 1e6:.1f} M tokens/s = "
          f"{arrow_seconds / ours_seconds:.2f}x pyarrow's rate; peak RSS of the measuring process "
          f"{result['peak_mib']:,.0f} MiB")


if __name__ == "__main__":
    main()
