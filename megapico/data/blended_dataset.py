"""Weighted blending of several datasets (Megatron's BlendedDataset).

At sample i the next sample comes from the dataset d maximising w_d * max(i, 1) - count_d (ties: lowest d),
which keeps every prefix of the stream within one sample of the weights. The loop is sequential, so it runs
as a few lines of C compiled once with gcc (Megatron compiles a C++ helper for the same reason); without a
compiler it falls back to Python. The result is cached like the GPT indices.
"""

import ctypes
import hashlib
import json
import os
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


def _compiled_helper() -> ctypes.CDLL | None:
    digest = hashlib.sha1(_C_SOURCE.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("MEGAPICO_CACHE", Path.home() / ".cache" / "megapico"))
    library = cache / f"blending-{digest}.so"
    if not library.is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                source, built = Path(tmp) / "blending.c", Path(tmp) / "blending.so"
                source.write_text(_C_SOURCE)
                subprocess.run(["gcc", "-O3", "-shared", "-fPIC", "-o", str(built), str(source)], check=True,
                               capture_output=True)
                os.replace(built, library)
        except (OSError, subprocess.CalledProcessError):
            return None
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
