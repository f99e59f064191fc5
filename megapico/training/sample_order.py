"""Which training samples a run's steps trained, from its run directory: the run's own dataset, built again.

Step s (1-based) trains samples [(s - 1) G, s G) of the training dataset's order for global batch G, at any layout
(data/sampler.py); at checkpoint step N, pico's learning dynamics save as `train_data/` the batch step N + 1 trains,
samples [N G, (N + 1) G). The dataset is the one training builds (run_data.build_run_data: build_train_dataset over
the run's data section for training.max_steps x G samples), from the run's config.yaml, so its sample-index caches
are found again, or rebuilt identically. G is the config's training.global_batch_size, or the checkpoints' consumed
samples per step.

A run that changed its data, its length or its global batch at a resume trained in more than one order; the
checkpoints' own config.yaml and megapico_state.json tell, and such a run is refused in one line rather than traced
in the wrong order.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megapico.checkpoint.training_state import STATE_FILE, step_of
from megapico.config import MegapicoConfig, load_config
from megapico.data.builders import build_train_dataset
from megapico.data.indexed_dataset import DataError
from megapico.data.readers import read_chunks


@dataclass
class Checkpoint:
    directory: Path
    step: int
    consumed_samples: int
    data_parallel_size: int


@dataclass
class RunOrder:
    """A run's training samples in the order its steps read them."""

    run_dir: Path
    config: MegapicoConfig
    global_batch: int
    dataset: object
    checkpoints: list[Checkpoint]

    @property
    def max_steps(self) -> int:
        return self.config.training.max_steps

    def step_of_sample(self, sample: int) -> int:
        """The step that trains global sample `sample` (0-based, in the run's order)."""
        if not 0 <= sample < self.max_steps * self.global_batch:
            raise DataError(f"{self.run_dir}: sample {sample} is outside the run's {self.max_steps} steps x "
                            f"{self.global_batch} samples (0..{self.max_steps * self.global_batch - 1})")
        return sample // self.global_batch + 1

    def step_samples(self, step: int) -> range:
        """The global samples of step `step`'s global batch."""
        if not 1 <= step <= self.max_steps:
            raise DataError(f"{self.run_dir}: step {step} is outside the run's steps 1..{self.max_steps} "
                            f"(training.max_steps of its config.yaml)")
        return range((step - 1) * self.global_batch, step * self.global_batch)

    def train_data_samples(self, step: int) -> range:
        """The global samples pico's learning dynamics saved as train_data/ at checkpoint step `step` (the batch of
        step + 1), checked row by row against the saved ones."""
        directory = self.run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics" / "train_data"
        if not directory.is_dir():
            saved = [c.step for c in self.checkpoints
                     if (c.directory / "learning_dynamics" / "train_data").is_dir()]
            raise DataError(f"{directory}: missing; this run saved train_data at steps {saved or 'none'} (the "
                            f"train_data of step N is the batch of step N + 1: --step N+1 traces it at any step)")
        samples = self.step_samples(step + 1)
        for row, sample in zip(_saved_rows(directory), samples, strict=True):
            if not np.array_equal(row, self.dataset[sample]):
                raise DataError(f"{directory}: a row differs from sample {sample} of the run's order (the data or "
                                f"its sample-index cache changed since the run); re-run on the run's own data")
        return samples


def _saved_rows(directory: Path) -> list[np.ndarray]:
    """The input_ids rows of a train_data/ dataset (save_to_disk), read as the preprocessing reads one."""
    rows = []
    for chunk in read_chunks(str(directory), ["input_ids"]):
        ids, lengths = chunk.token_ids["input_ids"]
        rows += np.split(np.asarray(ids, dtype=np.int64), np.cumsum(lengths)[:-1])
    return rows


def _checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Every checkpoint with its state file (finished or pruned), by step; its fields type-checked."""
    found = []
    for directory in sorted((run_dir / "checkpoints").glob("step_*"), key=lambda path: step_of(path.name)):
        path = directory / STATE_FILE
        if step_of(directory.name) < 0 or not path.is_file():
            continue
        try:
            state = json.loads(path.read_text())
            fields = [state["step"], state["consumed_samples"], state["data_parallel_size"]]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as err:
            raise DataError(f"{path}: unreadable checkpoint state ({type(err).__name__}); move the checkpoint "
                            f"away to trace the rest") from None
        if any(type(value) is not int or value < 0 for value in fields):
            raise DataError(f"{path}: step, consumed_samples and data_parallel_size must be counts; move the "
                            f"checkpoint away to trace the rest")
        found.append(Checkpoint(directory, *fields))
    return found


def _global_batch(config: MegapicoConfig, checkpoints: list[Checkpoint], run_dir: Path) -> int:
    """Samples per step: the same for every checkpoint past step 0 and the config, or one line saying why not."""
    batch, seen_in = config.training.global_batch_size or None, run_dir / "config.yaml"
    for checkpoint in checkpoints:
        if checkpoint.step == 0:
            continue
        if batch is None:
            batch, seen_in = max(1, checkpoint.consumed_samples // checkpoint.step), checkpoint.directory
        if checkpoint.consumed_samples != batch * checkpoint.step:
            raise DataError(f"{checkpoint.directory / STATE_FILE}: {checkpoint.consumed_samples} samples by step "
                            f"{checkpoint.step}, not {batch} per step ({seen_in}): the run changed its global batch "
                            f"at a resume, and its steps have no single order to trace")
    if batch is None and checkpoints:  # only step 0 so far: its launch's micro x accumulation x DP
        first = checkpoints[0]
        train = load_config(first.directory / "config.yaml", received=True).training
        batch = train.micro_batch_size * train.gradient_accumulation_steps * first.data_parallel_size
    if batch is None:
        raise DataError(f"{run_dir}: no checkpoint yet, and config.yaml leaves training.global_batch_size to the "
                        f"DP size; trace once step_0 is saved (pretrain.py saves it first)")
    return batch


def _check_one_order(config: MegapicoConfig, checkpoints: list[Checkpoint], run_dir: Path) -> None:
    """Every checkpoint's launch read the data as config.yaml does (same data section, same training.max_steps)."""
    for checkpoint in checkpoints:
        path = checkpoint.directory / "config.yaml"
        if not path.is_file():
            continue
        saved = load_config(path, received=True)
        if asdict(saved.data) != asdict(config.data) or saved.training.max_steps != config.training.max_steps:
            raise DataError(f"{path}: the data section or training.max_steps differs from {run_dir / 'config.yaml'}: "
                            f"the run changed its training order at a resume, and its steps have no single order "
                            f"to trace")


def open_run(run_dir: str | Path) -> RunOrder:
    """The run's training order, its dataset built (or its caches found) as training builds it."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir}: no config.yaml, not a megapico run directory (pass runs/RUN, as pretrain.py "
                        f"wrote it)")
    config = load_config(run_dir / "config.yaml", received=True)
    checkpoints = _checkpoints(run_dir)
    global_batch = _global_batch(config, checkpoints, run_dir)
    _check_one_order(config, checkpoints, run_dir)
    dataset = build_train_dataset(config.data, config.training.max_steps * global_batch, config.model.vocab_size)
    return RunOrder(run_dir, config, global_batch, dataset, checkpoints)
