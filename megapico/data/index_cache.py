"""Sample-index caches (.npy files) built once per filesystem, then checked equal on every rank.

On a shared filesystem global rank 0 builds and every other rank memory-maps its files. When a node cannot
see them (node-local disks: data.cache_dir or the data directory on local scratch), that node's local rank 0
builds the same arrays again (they are a deterministic function of the data and the config), so no rank
waits for files that never come. Then one small collective compares a fingerprint of the arrays every rank
mapped: ranks that would read different samples stop together, with one error naming what differs.

The default cache directory sits beside the data, and data may come from someone else: a cache directory or file
there that is a symbolic link would steer these reads and writes elsewhere, so it is refused (cache_directory,
load_or_build); files are written under a new random name and renamed, never through a link at a guessable name.
"""

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def cache_directory(cache_dir: str | Path | None, prefix: str | Path) -> Path:
    """data.cache_dir when set, else `index-cache` beside the data's prefix."""
    return Path(cache_dir) if cache_dir else Path(prefix).parent / "index-cache"


def _links(paths: dict[str, Path]) -> str:
    """The first of the cache directory and files that is a symbolic link, as a line naming it, or ""."""
    for path in (next(iter(paths.values())).parent, *paths.values()):
        if path.is_symlink():
            return (f"{path}: a symbolic link (to {os.readlink(path)}) in the sample-index cache; refusing to read "
                    f"or write through it (remove it; data.cache_dir names a plain directory)")
    return ""


@contextmanager
def _replacing(path: Path) -> Iterator[int]:
    """A new file descriptor under a random sibling name (the permissions of a plain new file, so a lab's group
    can share the cache), renamed onto `path` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(descriptor, 0o666 & ~mask)
    try:
        yield descriptor
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """A small file of the cache (the description of what an index was built from), written as the arrays are."""
    with _replacing(path) as descriptor, os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _write(paths: dict[str, Path], arrays: dict[str, np.ndarray]) -> None:
    for name, path in paths.items():
        with _replacing(path) as descriptor, os.fdopen(descriptor, "wb") as handle:
            np.save(handle, arrays[name])


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


def _load(path: Path) -> np.ndarray:
    """A cached index, memory-mapped: a plain integer .npy (never a pickle), else one line naming it."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a sample-index cache file ({str(err).splitlines()[0][:120]}); remove it, and it "
                        f"is rebuilt") from None
    if array.dtype.kind not in "iu":
        raise DataError(f"{path}: holds {array.dtype} values, not indices; remove it, and it is rebuilt")
    return array


def load_or_build(paths: dict[str, Path], build: Callable[[], dict[str, np.ndarray]]) -> tuple[dict, bool]:
    """({name: memory-mapped array}, whether this rank built them); collective over the world. A cache directory or
    file that is a symbolic link is refused on every rank alike, never followed."""
    refused = _links(paths)
    agree_across_ranks("links in the sample-index cache", refused or "none")
    if refused:
        raise DataError(refused)
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
    arrays = {} if missing else {name: _load(path) for name, path in paths.items()}
    agree_across_ranks("the sample index (set data.cache_dir to a directory that each node's ranks share)",
                       f"missing {missing[0]}" if missing else f"fingerprint {fingerprint(arrays)}")
    if missing:  # only reached without a world to compare with
        raise DataError(f"{missing[0]}: sample-index cache not found after building it")
    return arrays, built
