"""Merge throughput: N prefixes of M MB each merged into one, by 1 and by several copy threads, by several processes
each copying a contiguous range of prefixes into the one .bin at its offset (the merge tasks of a build on many
machines, --merge-tasks; here all on this machine), then against the copy through Python that merge_datasets did
before (16 MB reads and writes, one file after another).

    python benchmarks/bench_merge.py --prefixes 8 --mb 64 --workers 1 4 --processes 2 4 --dir /tmp/bench-merge

The inputs are freshly written, so they are read from the page cache; the output is fsynced (as the writer does), so
on a disk the write-back is measured too, and on /dev/shm only the copy.
"""

import argparse
import filecmp
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from pathlib import Path

import numpy as np

from megapico.data.indexed_dataset import IndexedDatasetWriter, copy_bins, merge_datasets


def _through_python(prefixes: list[Path], output: Path) -> None:
    with open(output, "wb") as out:
        for prefix in prefixes:
            with open(f"{prefix}.bin", "rb") as source:
                shutil.copyfileobj(source, out, length=1 << 24)
        out.flush()
        os.fsync(out.fileno())  # as the writer does before renaming


def _copy_part(paths: list[Path], output: Path, start: int) -> None:
    """One merge task: its range of .bin files into `output` (sized already) from `start`, fsynced."""
    descriptor = os.open(output, os.O_WRONLY)
    try:
        copy_bins(paths, descriptor, start)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _by_processes(prefixes: list[Path], output: Path, processes: int) -> None:
    """The output sized once, then `processes` processes copying contiguous ranges of prefixes at their offsets."""
    paths = [Path(f"{prefix}.bin") for prefix in prefixes]
    sizes = [path.stat().st_size for path in paths]
    with open(output, "wb") as handle:
        handle.truncate(sum(sizes))
    bounds = [len(paths) * rank // processes for rank in range(processes + 1)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_copy_part, [paths[a:b] for a, b in pairwise(bounds)], [output] * processes,
                      [sum(sizes[:a]) for a in bounds[:-1]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--mb", type=int, default=64, help="size of each prefix's .bin")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-merge"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    prefixes = []
    for index in range(args.prefixes):
        prefixes.append(args.dir / f"part{index}")
        tokens = rng.integers(0, 50280, args.mb << 19, dtype=np.uint16)  # mb MiB of uint16
        with IndexedDatasetWriter(prefixes[-1], np.uint16) as writer:
            writer.add_documents(tokens, np.full(len(tokens) // 512, 512, dtype=np.int32))
    total_mb = args.prefixes * args.mb
    for workers in args.workers:
        start = time.perf_counter()
        merged = merge_datasets(prefixes, args.dir / f"merged{workers}", workers)
        print(f"merge_datasets, {workers} thread(s): {total_mb / (time.perf_counter() - start):,.0f} MB/s "
              f"({len(merged):,} documents)")
    for processes in args.processes:
        start = time.perf_counter()
        _by_processes(prefixes, args.dir / f"processes{processes}.bin", processes)
        print(f"{processes} merge tasks (processes, one range each): "
              f"{total_mb / (time.perf_counter() - start):,.0f} MB/s")
    start = time.perf_counter()
    _through_python(prefixes, args.dir / "python.bin")
    print(f"through Python (before): {total_mb / (time.perf_counter() - start):,.0f} MB/s")
    outputs = [f"merged{w}.bin" for w in args.workers] + [f"processes{p}.bin" for p in args.processes]
    assert all(filecmp.cmp(args.dir / name, args.dir / "python.bin", shallow=False) for name in outputs)
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
