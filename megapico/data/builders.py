"""From the `data` config section to the datasets the trainer reads (single prefix or weighted blend)."""

import math

from megapico.config import DataConfig
from megapico.data.blended_dataset import BlendedDataset
from megapico.data.gpt_dataset import GPTDataset
from megapico.data.index_cache import cache_directory
from megapico.data.indexed_dataset import DataError, IndexedDataset
from megapico.data.pretokenized_dataset import PretokenizedDataset


def parse_blend(paths: list[str]) -> list[tuple[float, str]]:
    """["PREFIX"] | ["0.3", "A", "0.7", "B"] | ["0.3 A 0.7 B"] (Megatron's --data-path) -> [(weight, prefix)]."""
    items = [item for path in paths for item in str(path).split()]
    if not items:
        raise DataError("data.train_data_path is empty: give a .bin/.idx prefix (see tools/preprocess_data.py)")
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise DataError(f"data path {items} must be a single prefix or weight/prefix pairs like 0.3 A 0.7 B")
    try:
        blend = [(float(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
    except ValueError:
        raise DataError(f"data path {items}: weights must be numbers (form: 0.3 A 0.7 B)") from None
    if any(weight <= 0 for weight, _ in blend):
        raise DataError(f"data path {items}: weights must be positive")
    return blend


def build_dataset(paths: list[str], split_name: str, num_samples: int, seq_len: int, seed: int,
                  split: str = "969,30,1", cache_dir: str = "", vocab_size: int | None = None
                  ) -> GPTDataset | BlendedDataset:
    """The dataset of one split over a prefix or a blend; rank 0 builds the index caches, others wait. With
    vocab_size (the model's), every sample's ids are checked against it as it is read (GPTDataset.__getitem__)."""
    blend = parse_blend(paths)
    total = sum(weight for weight, _ in blend)
    datasets = []
    for weight, prefix in blend:
        wanted = num_samples if len(blend) == 1 else math.ceil(weight / total * num_samples * 1.005)
        datasets.append(GPTDataset(IndexedDataset(prefix), split_name, wanted, seq_len, seed, split,
                                   cache_dir or None, vocab_size))
    if len(datasets) == 1:
        return datasets[0]
    return BlendedDataset(datasets, [weight / total for weight, _ in blend], num_samples,
                          cache_directory(cache_dir, blend[0][1]))


def build_train_dataset(data: DataConfig, num_samples: int, vocab_size: int | None = None
                        ) -> GPTDataset | BlendedDataset | PretokenizedDataset:
    """The training samples per data.samples: Megatron's shuffled GPT samples of the train split (at least
    num_samples of them, ids checked against vocab_size as read), or pico-train's pretokenized rows of one prefix
    in document order."""
    if data.samples == "megatron":
        return build_dataset(data.train_data_path, "train", num_samples, data.seq_len, data.seed, data.split,
                             data.cache_dir, vocab_size)
    blend = parse_blend(data.train_data_path)
    if len(blend) > 1:
        raise DataError(f"data.train_data_path {data.train_data_path}: data.samples=pretokenized reads one prefix in "
                        f"pico-train's row order, not a weighted blend; merge the prefixes in the order to train "
                        f"(tools/merge_datasets.py) or use data.samples=megatron")
    return PretokenizedDataset(IndexedDataset(blend[0][1]), data.seq_len, vocab_size)
