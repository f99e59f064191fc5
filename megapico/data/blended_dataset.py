"""Weighted blending of several datasets (Megatron's BlendedDataset).

At sample i the next sample comes from the dataset d maximising w_d * max(i, 1) - count_d (ties: lowest d),
which keeps every prefix of the stream within one sample of the weights. The loop is sequential, so it runs
as a few lines of C compiled once with gcc (Megatron compiles a C++ helper for the same reason); without a
compiler it falls back to Python. The result is cached like the GPT indices.

The compiled helper is a shared library loaded into the training process, so whoever can write it (or the
directory it sits in) can run code there. The cache directory is therefore created private (0o700), and an
existing directory or library that another user owns or that group/others can write is refused with an error,
never loaded and never silently replaced by the Python loop (that would hide a planted file).
"""

import ctypes
import hashlib
import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from megapico.data.index_cache import load_or_build

_C_SOURCE = r"""
#include <stdint.h>
void build_blending_indices(int16_t *dataset_index, int64_t *dataset_sample_index, const double *weights,
                            int32_t num_datasets, int64_t size, int64_t *counts) {
    for (int32_t d = 0; d < num_datasets; ++d) counts[d] = 0;
    for (int64_t i = 0; i < size; ++i) {
        double x = i > 1 ? (double)i : 1.0;
        int32_t best = 0;
        double best_error = weights[0] * x - (double)counts[0];
        for (int32_t d = 1; d < num_datasets; ++d) {
            double error = weights[d] * x - (double)counts[d];
            if (error > best_error) { best_error = error; best = d; }
        }
        dataset_index[i] = (int16_t)best;
        dataset_sample_index[i] = counts[best]++;
    }
}
"""


class UnsafeCacheError(RuntimeError):
    """The helper's cache could hold someone else's code; the message is one line naming the path and the fix."""


_FIX = "remove it or set MEGAPICO_CACHE to a directory only you can write"


def _cache_dir() -> Path:
    return Path(os.environ.get("MEGAPICO_CACHE", Path.home() / ".cache" / "megapico"))


def _library_path(cache: Path) -> Path:
    """Named by the source's digest, so a changed helper is rebuilt rather than an old one loaded."""
    return cache / f"blending-{hashlib.sha1(_C_SOURCE.encode()).hexdigest()[:12]}.so"


def _refuse_unless_private(path: Path, info: os.stat_result, what: str, want_type: int, role: str) -> None:
    """Raise unless `path` is of the wanted type, ours, and writable by nobody else (root can write anything)."""
    problems = []
    if stat.S_IFMT(info.st_mode) != want_type:
        problems.append("a symlink" if stat.S_ISLNK(info.st_mode) else f"not a {what}")
    if info.st_uid != os.geteuid():
        problems.append(f"owned by uid {info.st_uid}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"writable by group/others (mode {stat.S_IMODE(info.st_mode):o})")
    if problems:
        raise UnsafeCacheError(f"{path}: refused, {' / '.join(problems)} ({role} megapico would load into the "
                               f"training process); {_FIX}")


def _compiled_helper() -> ctypes.CDLL | None:
    """The C helper, built on first use; None (use Python) when it cannot be built, UnsafeCacheError when the
    cache directory or an existing library could have been written by another user."""
    cache = _cache_dir()
    library = _library_path(cache)
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        # follows a symlinked cache directory: what matters is who can write the directory the library is in
        directory = os.stat(cache)
    except OSError:
        return None  # no cache to build into (read-only home, a file in the way): the Python loop still works
    _refuse_unless_private(cache, directory, "directory", stat.S_IFDIR, "the directory of a shared library")
    try:
        info = os.lstat(library)
    except FileNotFoundError:
        try:
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # private (0o700) until the atomic rename
                source, built = Path(tmp) / "blending.c", Path(tmp) / "blending.so"
                source.write_text(_C_SOURCE)
                subprocess.run(["gcc", "-O3", "-shared", "-fPIC", "-o", str(built), str(source)], check=True,
                               capture_output=True)
                os.chmod(built, 0o700)
                os.replace(built, library)
        except (OSError, subprocess.CalledProcessError):
            return None
        info = os.lstat(library)  # what is there now, whoever put it there
    # checked by lstat, then loaded by the same path: the directory is ours and closed to others, so no other
    # user can swap the file in between
    _refuse_unless_private(library, info, "regular file", stat.S_IFREG, "a shared library")
    return ctypes.CDLL(str(library))


def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index [size] int16, sample index within that dataset [size] int64)."""
    weights = np.ascontiguousarray(np.asarray(weights, dtype=np.float64) / np.sum(weights))
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    counts = np.zeros(len(weights), dtype=np.int64)
    helper = _compiled_helper()
    if helper is not None:
        pointer = np.ctypeslib.as_ctypes
        helper.build_blending_indices(pointer(dataset_index) if size else None,
                                      pointer(dataset_sample_index) if size else None, pointer(weights),
                                      ctypes.c_int32(len(weights)), ctypes.c_int64(size), pointer(counts))
        return dataset_index, dataset_sample_index
    for i in range(size):
        best = int(np.argmax(weights * max(i, 1) - counts))
        dataset_index[i], dataset_sample_index[i] = best, counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


class BlendedDataset:
    """`size` samples drawn from `datasets` in the proportions `weights`."""

    def __init__(self, datasets: list, weights: list[float], size: int, cache_dir: Path) -> None:
        self.datasets = datasets
        description = json.dumps(dict(cls="BlendedDataset", weights=[float(w) for w in weights], size=size,
                                      parts=[d.description_digest for d in datasets]), sort_keys=True)
        digest = hashlib.md5(description.encode()).hexdigest()
        names = ("dataset_index", "dataset_sample_index")
        arrays, _ = load_or_build({name: cache_dir / f"{digest}-{name}.npy" for name in names},
                                  lambda: dict(zip(names, build_blending_indices(np.asarray(weights), size),
                                                   strict=True)))
        self.dataset_index, self.dataset_sample_index = (arrays[name] for name in names)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> np.ndarray:
        dataset = self.datasets[int(self.dataset_index[index])]
        return dataset[int(self.dataset_sample_index[index]) % len(dataset)]
