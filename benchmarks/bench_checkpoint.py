"""What checkpoint verification costs: sha256 seconds per GB on one core (each rank hashes its own files, in
parallel with the others), against reading the same bytes without hashing and against the size-only check.
    python benchmarks/bench_checkpoint.py --gib 1
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from megapico.checkpoint.manifest import CHUNK, sha256_of


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    size = int(args.gib * 2**30)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.pt"
        with open(path, "wb") as handle:
            for _ in range(size // CHUNK):
                handle.write(os.urandom(CHUNK))
        sha256_of(path)  # warm the page cache: measure the hashing, as right after a save
        started = time.perf_counter()
        with open(path, "rb") as handle:
            while handle.read(CHUNK):
                pass
        read = time.perf_counter() - started
        started = time.perf_counter()
        sha256_of(path)
        hashed = time.perf_counter() - started
        started = time.perf_counter()
        assert path.stat().st_size == size
        sized = time.perf_counter() - started
    gib = size / 2**30
    print(f"{gib:.2f} GiB from the page cache: read {read / gib:.2f} s/GiB, sha256 {hashed / gib:.2f} s/GiB "
          f"({gib / hashed:.2f} GiB/s), size check {sized * 1e6:.0f} us")


if __name__ == "__main__":
    main()
