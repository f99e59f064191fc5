"""The learning dynamics a run captures, and the analysis they feed (issue 33), beside the loop.

Where a capture goes: step 0's and every checkpoint's are pico's `learning_dynamics/` of the checkpoint (written
before its manifest; a stop's save leaves them to the resume); every checkpointing.learning_dynamics.interval steps a
capture is taken for the analysis alone and nothing of it is stored (storing learning dynamics is what checkpoints
are for). Every capture takes its splits the same way, by capture_splits (an analysis-only one only the splits and
kinds the analysis reads: no backward where it reads no gradients, no pass where it reads only weights), so the
analysis of a step is the same whichever way it was captured. With
checkpointing.learning_dynamics.analysis set, rank 0 hands each capture to the AnalysisRunner
(megapico/training/analysis_runner.py), which computes pico-analyze's metrics in a background process (on rank 0's
GPU where it has one: analysis_device); the loop polls it at step ends and logs what it reports at its step N.
A capture changes no training step: it reads the fp32 weights and the data, and draws no random number.

The analysis config is checked at launch on every rank, before any step trains, against the steps this run
captures (captured_steps: as the loop captures), its val sequences and its global batch.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megapico.analysis import AnalysisSpec, check_analysis, existing_results, load_analysis
from megapico.analysis.spec import DATA_TYPES
from megapico.checkpoint.files import read_checkpoint_file
from megapico.checkpoint.reshard import gather_master_weights
from megapico.config import ConfigError, MegapicoConfig
from megapico.data.indexed_dataset import IndexedDataset
from megapico.data.pretokenized_dataset import TextDocuments
from megapico.parallel import ParallelState
from megapico.training.analysis_runner import AnalysisRunner, read_by
from megapico.training.analysis_worker import analysis_device, owed_steps
from megapico.training.learning_dynamics import (
    capture_splits,
    first_sequences,
    next_global_batch,
    probe_precision,
    save_learning_dynamics,
)
from megapico.training.logger import RunLogger
from megapico.training.run_data import RunData

KEY = "checkpointing.learning_dynamics"
MAX_WAIT_AT_END_S = 540.0  # the run's lock counts a run stale after STALE_S = 600 s without a heartbeat


def learning_dynamics_val_set(config: MegapicoConfig, eval_dataset) -> list:  # noqa: ANN001
    """Every document of checkpointing.learning_dynamics.eval_data_path, each at its own length (at most
    max_seq_len + 1 tokens); without one, the first learning_dynamics.batch_size sequences of the eval set."""
    dynamics = config.checkpointing.learning_dynamics
    if not dynamics.eval_data_path:
        return first_sequences(eval_dataset, dynamics.batch_size)
    documents = TextDocuments(IndexedDataset(dynamics.eval_data_path), config.model.max_seq_len + 1,
                              "learning-dynamics val")
    return first_sequences(documents, len(documents))


def fp32_weights(engine) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """This TP rank's fp32 weights being trained: the ZeRO masters in a bf16 engine (all-gathered over DP), the
    module itself otherwise."""
    if engine.bfloat16_enabled():
        return gather_master_weights(engine)
    return engine.module.state_dict()


def captured_steps(config: MegapicoConfig) -> Callable[[int], bool]:
    """Whether the run captures step N: step 0, every learning-dynamics interval, every checkpoint (save_interval,
    exit_interval, the last step), up to training.max_steps."""
    train, interval = config.training, config.checkpointing.learning_dynamics.interval
    save, exit_interval = config.checkpointing.save_interval, train.exit_interval

    def captured(step: int) -> bool:
        return 0 <= step <= train.max_steps and (step in (0, train.max_steps) or step % save == 0 or bool(
            interval and step % interval == 0) or bool(exit_interval and step % exit_interval == 0))
    return captured


def check_learning_dynamics(config: MegapicoConfig, val_sequences: int, global_batch: int) -> AnalysisSpec | None:
    """The analysis the run computes (None: none), refused in one line where pico-analyze would refuse it on this
    run or where the settings contradict each other; call on every rank before any step trains."""
    dynamics = config.checkpointing.learning_dynamics
    if dynamics.interval < 0:
        raise ConfigError(f"{KEY}.interval must be >= 0 (0 = captures at checkpoints only), got {dynamics.interval}")
    if not dynamics.analysis:
        if dynamics.interval:
            raise ConfigError(f"{KEY}.interval={dynamics.interval} captures for the analysis alone, and {KEY}.analysis "
                              f"is empty; name a pico-analyze metrics YAML there, or set {KEY}.interval=0")
        return None
    if not dynamics.enabled:
        raise ConfigError(f"{KEY}.analysis={dynamics.analysis} analyzes the learning dynamics, which {KEY}.enabled="
                          f"false turns off; set {KEY}.enabled=true, or {KEY}.analysis=''")
    if not 0 <= dynamics.wait_at_end_s <= MAX_WAIT_AT_END_S:
        raise ConfigError(f"{KEY}.wait_at_end_s must be between 0 and {MAX_WAIT_AT_END_S:g} (the run's lock has no "
                          f"heartbeat meanwhile), got {dynamics.wait_at_end_s}")
    analysis_device(dynamics.analysis_device, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    spec = load_analysis(dynamics.analysis)
    check_analysis(spec, config.model, captured_steps(config), val_sequences, global_batch)
    return spec


def kinds_read(spec: AnalysisSpec) -> dict[str, set[str]]:
    """{split: the kinds (activations, weights, gradients) the analysis reads of it}, by read_by: what an
    analysis-only capture takes (a split absent here is not captured; a kind absent, not computed)."""
    reads: dict[str, set[str]] = {}
    for split, kind, _ in read_by(spec):
        reads.setdefault(split, set()).add(kind)
    return reads


class Captures:
    """The loop's captures of one launch (collective calls on every rank) and rank 0's analysis of them."""

    def __init__(self, config: MegapicoConfig, engine, parallel: ParallelState, data: RunData,  # noqa: ANN001
                 val_sequences: Sequence[np.ndarray], spec: AnalysisSpec | None, run_precision: str, run_dir: Path,
                 logger: RunLogger) -> None:
        """`val_sequences`: learning_dynamics_val_set's; `spec`: check_learning_dynamics' (checked at launch)."""
        self.dynamics = config.checkpointing.learning_dynamics
        self.engine, self.parallel, self.data, self.logger = engine, parallel, data, logger
        self.val_sequences, self.spec = val_sequences, spec
        if self.dynamics.enabled and len(val_sequences) <= config.model.d_model:
            logger.warn(f"learning dynamics: the val split holds {len(val_sequences)} sequences; pico-analyze's "
                        f"pwcca needs more than d_model={config.model.d_model}")
        self.precision = probe_precision(self.dynamics.precision, run_precision)
        self.run_dir, self.runner = run_dir, None
        self.reads = kinds_read(spec) if spec is not None else {}
        if self.spec is not None and dist.get_rank() == 0:
            owed = owed_steps(self.spec, run_dir)
            if owed:
                print(f"analysis {self.spec.analysis_name}: steps {', '.join(map(str, owed))} owe comparative metrics "
                      f"(kept in {run_dir / 'analysis_pending'}); computed when their target step is captured",
                      flush=True)
            self.runner = AnalysisRunner(self.spec, run_dir, config.model,
                                         analysis_device(self.dynamics.analysis_device, engine.device))

    def due(self, step: int) -> bool:
        """Whether `step` takes an analysis-only capture (a checkpoint's capture serves it otherwise)."""
        return bool(self.dynamics.interval) and step % self.dynamics.interval == 0

    def capture(self, step: int, consumed: int, checkpoint: Path | None = None) -> None:
        """pico's learning dynamics of `step`, written into `checkpoint`/learning_dynamics/ when given, and handed to
        the analysis. The train split is the batch the next step trains (none past the data's end); the val split is
        the same every time; an analysis-only capture takes only the splits and kinds the analysis reads."""
        splits = {"val": self.val_sequences}
        upcoming = next_global_batch(self.data.train, consumed, self.data.global_batch)
        if upcoming is not None:
            splits = {"train": upcoming, **splits}
        if checkpoint is None:  # for the analysis alone: a split it does not read is not captured
            splits = {split: sequences for split, sequences in splits.items() if split in self.reads}
        engine, dp_group, micro = self.engine, self.parallel.dp_group, self.dynamics.micro_batch_size
        if checkpoint is not None:
            states = save_learning_dynamics(engine.module, fp32_weights(engine), splits,
                                            checkpoint / "learning_dynamics", micro, dp_group, engine.device,
                                            self.data.tokenizer, self.precision)
        else:
            states = capture_splits(engine.module, fp32_weights(engine), splits, micro, dp_group, engine.device,
                                    self.precision, self.reads)
        if self.runner is not None:
            self.runner.submit(step, states)

    def resubmit(self, step: int, checkpoint: Path) -> None:
        """Hand a resumed checkpoint's stored capture to the analysis again when its results are not all written (the
        launch before was killed before its analysis finished); the runner computes only what is missing."""
        if self.runner is None:
            return
        wanted = {metric.result_name for metric in self.spec.metrics}
        if wanted <= existing_results(self.run_dir, self.spec.analysis_name, step):
            return
        directory = checkpoint / "learning_dynamics"
        splits = {metric.data_split for metric in self.spec.metrics if (directory / f"{metric.data_split}_weights.pt"
                                                                        ).is_file()}
        self.runner.submit(step, {split: {kind: read_checkpoint_file(directory / f"{split}_{kind}.pt")
                                          for kind in DATA_TYPES} for split in splits})

    def log_results(self, finished: list[tuple[int, dict[str, float]]]) -> None:
        for step, scalars in finished:
            self.logger.log_analysis(step, self.spec.analysis_name, scalars)

    def poll(self) -> None:
        """Log what the analysis finished since the last poll (rank 0; no wait)."""
        if self.runner is not None:
            self.log_results(self.runner.poll())

    def close(self, stopping: bool) -> None:
        """At the end of the launch: wait up to learning_dynamics.wait_at_end_s for the analysis (after a stop, not
        at all: the next launch completes what is owed) and log what it finished."""
        if self.runner is not None:
            self.log_results(self.runner.close(0.0 if stopping else self.dynamics.wait_at_end_s))
