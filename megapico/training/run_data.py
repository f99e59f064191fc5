"""A run's data, built before the engine: the training samples in the run's order, the eval set, the tokenizer,
each checked against the model and the schedule first (one line naming the file and the fix)."""

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megapico.checkpoint.paths import write_text
from megapico.config import ConfigError, MegapicoConfig
from megapico.data.builders import build_dataset, build_train_dataset, parse_blend
from megapico.data.indexed_dataset import DataError, IndexedDataset
from megapico.data.pretokenized_dataset import TextDocuments
from megapico.data.provenance import check_tokenizer_for_data, record_path
from megapico.data.tokenizer import Tokenizer, load_tokenizer


@dataclass
class RunData:
    train: object
    """The training samples of every step, in order (a PretrainingSampler walks them from the consumed count)."""
    eval: object
    tokenizer: Tokenizer | None
    global_batch: int
    """micro batch x gradient accumulation x DP: the samples of one optimizer step."""


def check_data_fits_model(config: MegapicoConfig) -> None:
    """Before any compute: the tokenizer's ids and the data's must fit the model's vocabulary, and the tokenizer
    must be the one the data was built with (the fingerprint preprocessing records beside it)."""
    vocab = config.model.vocab_size
    prefixes = [prefix for _, prefix in parse_blend(config.data.train_data_path) + (
        parse_blend(config.data.eval_data_path) if config.data.eval_data_path else [])]
    check_tokenizer_for_data(prefixes, config.data.tokenizer or None, vocab)
    for prefix in prefixes:  # data without the record (Megatron's, older megapico's): the first 16M tokens
        if record_path(prefix).is_file():  # its largest id was recorded whole and checked just above
            continue
        largest = IndexedDataset(prefix).max_token_id()
        if largest >= vocab:
            raise DataError(f"{prefix}.bin: token id {largest} >= model.vocab_size {vocab} (was it tokenized with "
                            f"another tokenizer?)")


def build_eval_dataset(config: MegapicoConfig):  # noqa: ANN202
    """The eval set, the same at every layout (an evaluation scores its first evaluation.max_sequences): the
    TextDocuments of data.eval_data_path for evaluation.perplexity=pico, else one epoch of seq_len samples of
    data.eval_data_path (whole) or of the train prefix's valid split; a blend, which has no whole, is drawn
    max_sequences samples long."""
    data, evaluation = config.data, config.evaluation
    if evaluation.max_sequences < 0:
        raise ConfigError(f"evaluation.max_sequences must be >= 0 (0 = the whole eval set), got "
                          f"{evaluation.max_sequences}")
    if evaluation.perplexity == "pico":
        blend = parse_blend(data.eval_data_path) if data.eval_data_path else []
        if len(blend) != 1:
            raise ConfigError(f"evaluation.perplexity=pico scores every document of one prefix as a text; set "
                              f"data.eval_data_path to one prefix (pico's paloma texts, preprocessed without "
                              f"--append-eod), got {list(data.eval_data_path)}")
        return TextDocuments(IndexedDataset(blend[0][1]), config.model.max_seq_len, "evaluation")
    paths, split_name, split = (data.eval_data_path, "train", "1,0,0") if data.eval_data_path else (
        data.train_data_path, "valid", data.split)
    blended = len(parse_blend(paths)) > 1
    if blended and not evaluation.max_sequences:
        raise ConfigError(f"evaluation.max_sequences=0 scores the whole eval set, but {list(paths)} is a weighted "
                          f"blend, which has no whole; set evaluation.max_sequences to the samples each evaluation "
                          f"draws from it")
    return build_dataset(paths, split_name, evaluation.max_sequences if blended else 1, data.seq_len, data.seed, split,
                         data.cache_dir, config.model.vocab_size)


def build_run_data(config: MegapicoConfig, dp_size: int, run_dir: Path) -> RunData:
    """Check the data against the model, keep the run's own tokenizer.json (what its exports ship), and build the
    training samples of training.max_steps steps and the eval set."""
    train, data = config.training, config.data
    check_data_fits_model(config)  # loads data.tokenizer: past it, a HF one is a file `tokenizers` reads
    tokenizer = load_tokenizer(data.tokenizer) if data.tokenizer else None
    if dist.get_rank() == 0 and tokenizer is not None and (text := tokenizer.tokenizers_json()) is not None:
        write_text(run_dir / "tokenizer.json", text)
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * dp_size
    train_dataset = build_train_dataset(data, train.max_steps * global_batch, config.model.vocab_size)
    if data.samples == "pretokenized" and train_dataset.steps_covered(global_batch) < train.max_steps:
        raise ConfigError(f"{train_dataset.indexed.prefix}: {len(train_dataset):,} rows cover "
                          f"{train_dataset.steps_covered(global_batch):,} steps of global batch {global_batch}, but "
                          f"training.max_steps={train.max_steps}; set training.max_steps <= "
                          f"{train_dataset.steps_covered(global_batch)} or add rows")
    return RunData(train_dataset, build_eval_dataset(config), tokenizer, global_batch)


__all__ = ["RunData", "build_eval_dataset", "build_run_data", "check_data_fits_model"]
