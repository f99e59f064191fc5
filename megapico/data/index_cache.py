"""Sample-index caches (.npy files) built once per filesystem, then checked equal on every rank.

On a shared filesystem global rank 0 builds and every other rank memory-maps its files. When a node cannot
see them (node-local disks: data.cache_dir or the data directory on local scratch), that node's local rank 0
builds the same arrays again (they are a deterministic function of the data and the config), so no rank
waits for files that never come. Then one small collective compares a fingerprint of the arrays every rank
mapped: ranks that would read different samples stop together, with one error naming what differs.
"""

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch.distributed as dist

from megapico.data.indexed_dataset import DataError
from megapico.parallel.state import agree_across_ranks

FINGERPRINT_ELEMENTS = 1 << 20  # a strided subset per array: a few MB hashed, whatever the run's length


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write(paths: dict[str, Path], arrays: dict[str, np.ndarray]) -> None:
    for name, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
        np.save(tmp, arrays[name])
        os.replace(tmp, path)


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """md5 over each array's length, dtype and a strided subset including its last element."""
    digest = hashlib.md5()
    for name in sorted(arrays):
        array = arrays[name]
        stride = max(1, len(array) // FINGERPRINT_ELEMENTS)
        digest.update(f"{name}:{len(array)}:{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array[::stride]).tobytes())
        if len(array):
            digest.update(np.ascontiguousarray(array[-1:]).tobytes())
    return digest.hexdigest()


def load_or_build(paths: dict[str, Path], build: Callable[[], dict[str, np.ndarray]]) -> tuple[dict, bool]:
    """({name: memory-mapped array}, whether this rank built them); collective over the world."""
    built = False
    if not all(path.is_file() for path in paths.values()) and _rank() == 0:
        _write(paths, build())
        built = True
    _barrier()
    if not all(path.is_file() for path in paths.values()) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _write(paths, build())  # this node does not see rank 0's files: a node-local cache
        built = True
    _barrier()
    missing = [str(path) for path in paths.values() if not path.is_file()]
    arrays = {} if missing else {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    agree_across_ranks("the sample index (set data.cache_dir to a directory that each node's ranks share)",
                       f"missing {missing[0]}" if missing else f"fingerprint {fingerprint(arrays)}")
    if missing:  # only reached without a world to compare with
        raise DataError(f"{missing[0]}: sample-index cache not found after building it")
    return arrays, built
