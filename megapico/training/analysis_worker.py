"""The analysis's background process (started by megapico/training/analysis_runner.py on rank 0) and its state: which
comparative targets it holds and what each captured step still owes.

Comparative metrics (cka, pwcca) compare a step with a target step's capture. A step captured before its target
keeps only what they read (needed_for_targets, never a checkpoint's worth) in `analysis_pending/step_N.pt`; the
target keeps its share in `analysis_pending/target_T.pt` for every later step. When the target is captured, each
pending step's owed metrics are written and its file deleted: a finished run's results equal pico-analyze's. A stop
puts every capture still queued there too (AnalysisRunner.close), owing every metric: a pending file is
{"step", "owes": [result names], "dynamics"}, and a new worker on the same run directory computes at start what its
pending files owe and can be computed (the rest when their target is captured). owed_steps() lists what is owed.

Stops: results and pending files are written to a temporary and renamed (whole or absent); a step's pending file
is written before its results, a target's file before the pending steps are completed. A step's files on disk are
neither recomputed nor returned again, so a resumed run's metrics.jsonl has no duplicates. SIGTERM stops the
worker between writes, never between a result's file and its message to the training process (a result on disk is
a result logged); SIGINT (a Ctrl-C reaching the whole process group) is the training process's to handle.

Device (checkpointing.learning_dynamics.analysis_device): each component matrix is moved to the worker's device as a
metric reads it, so the GPU holds a few matrices at a time within GPU_MEMORY_BUDGET_GIB, on the local GPU of rank 0
and in the worker's own CUDA context (never the training process's stream); on the CPU the path is unchanged.
"""

import dataclasses
import os
import re
import signal
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from megapico.analysis.metrics import CPU, LAYER_KEY, Dynamics, analyze, needed_for_targets
from megapico.analysis.results import existing_results, flat_scalars, write_results
from megapico.analysis.spec import AnalysisSpec, MetricSpec, parse_analysis
from megapico.checkpoint.files import read_checkpoint_file
from megapico.checkpoint.paths import inside, replacing
from megapico.config import ConfigError, ModelConfig

PENDING_DIR = "analysis_pending"
STEP_FILE = re.compile(r"step_(\d+)\.pt")
# The worker's threads: a quarter of its share of the node beside 8 training ranks, 1 to 4 (a CPU run on a laptop
# gets 1; an A100 node's 64-128 cores give 4)
WORKER_THREADS = max(1, min(4, (os.cpu_count() or 1) // 32))
WORKER_NICENESS = 10  # the OS serves the training ranks first when the cores are busy
GPU_MEMORY_BUDGET_GIB = 4.0  # large's biggest matrix (ov_circuit gradients, 1536 x 18432 fp32) is 0.1 GiB
Scalars = dict[str, float]
Done = list[tuple[int, Scalars]]


def analysis_device(setting: str, training_device: torch.device) -> torch.device:
    """Where the worker computes, by checkpointing.learning_dynamics.analysis_device (one of auto | cpu | cuda, checked
    with the config): `cpu`; `cuda`, the training rank's own GPU (refused without one); `auto`, that GPU where the
    rank trains on one, else the CPU."""
    if setting == "cpu" or (setting == "auto" and training_device.type != "cuda"):
        return torch.device("cpu")
    if training_device.type != "cuda":
        raise ConfigError(f"checkpointing.learning_dynamics.analysis_device=cuda, but this run trains on "
                          f"{training_device.type}; set it to auto or cpu")
    return torch.device("cuda", training_device.index or 0)


def only(spec: AnalysisSpec, metrics: list[MetricSpec]) -> AnalysisSpec:
    return dataclasses.replace(spec, metrics=tuple(metrics))


def unpacked(buffer: torch.Tensor, layout: list[tuple]) -> dict:
    """A capture as views of the one shared-memory buffer it was packed into (layout: (split, kind, key, dtype,
    shape, offset) per tensor; AnalysisRunner packs it)."""
    dynamics: dict = {}
    for split, kind, key, dtype, shape, offset in layout:
        view = buffer[offset:offset + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
        dynamics.setdefault(split, {}).setdefault(kind, {})[key] = view
    return dynamics


def _kept(dynamics: Dynamics, spec: AnalysisSpec) -> dict:
    """What the comparative metrics of `spec` read of a capture (every layer of each needed suffix)."""
    kept: dict = {}
    for split, kind, suffix in sorted(needed_for_targets(spec)):
        for key, tensor in dynamics[split][kind].items():
            match = LAYER_KEY.match(key)
            if match and key[match.end():] == suffix:
                kept.setdefault(split, {}).setdefault(kind, {})[key] = tensor.clone()
    return kept


def save_pending(path: Path, step: int, owes: list[str], dynamics: Mapping) -> None:
    """A pending file: the step, the results it owes and the tensors they read (each its own storage)."""
    with replacing(path) as tmp:
        torch.save({"step": step, "owes": owes, "dynamics": dynamics}, tmp)


def _pending_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(match[1]) for path in directory.iterdir() if (match := STEP_FILE.fullmatch(path.name)))


def owed_steps(spec: AnalysisSpec, run_dir: Path) -> list[int]:
    """Steps kept in analysis_pending/ whose results are not all written: owed until their target is captured, or
    (a capture a stop left queued) until the next launch's worker starts."""
    run_dir = Path(run_dir)
    return [step for step in _pending_steps(run_dir / PENDING_DIR)
            if {metric.result_name for metric in spec.metrics} - existing_results(run_dir, spec.analysis_name, step)]


class Analyst:
    """The worker's state: which targets it holds, what each step still owes. Runs in the background process (and
    in tests, directly)."""

    def __init__(self, spec: AnalysisSpec, run_dir: Path, model: ModelConfig,
                 device: torch.device = CPU) -> None:
        self.spec, self.run_dir, self.model, self.device = spec, Path(run_dir), model, device
        self.pending = inside(self.run_dir, self.run_dir / PENDING_DIR)
        self.targets: dict[int, Dynamics] = {}
        self.target_steps = {metric.target_checkpoint for metric in spec.metrics if metric.comparative}
        self.writing = _no_stop  # what a result's write and its report run inside (the worker: no SIGTERM between)

    def _target(self, step: int) -> Dynamics | None:
        path = self.pending / f"target_{step}.pt"
        if step not in self.targets and path.is_file():
            self.targets[step] = read_checkpoint_file(path)["dynamics"]
        return self.targets.get(step)

    def _todo(self, step: int, owes: set[str]) -> list[MetricSpec]:
        written = existing_results(self.run_dir, self.spec.analysis_name, step)
        return [metric for metric in self.spec.metrics if metric.result_name in owes - written]

    def _analyze(self, step: int, todo: list[MetricSpec], dynamics: Dynamics, report: Callable,
                 on_file: set[str]) -> list[MetricSpec]:
        """Write what of `todo` can be computed now; keep in step_N.pt what waits for a later target (unless the
        file already holds exactly that); warn of what never can. Returns what waits."""
        ready = [metric for metric in todo
                 if not metric.comparative or self._target(metric.target_checkpoint) is not None]
        later = [metric for metric in todo if metric not in ready and metric.target_checkpoint > step]
        if later and {metric.result_name for metric in later} != on_file:
            save_pending(self.pending / f"step_{step}.pt", step, [metric.result_name for metric in later],
                         _kept(dynamics, only(self.spec, later)))
        for metric in todo:
            if metric not in ready and metric not in later:
                report(("warning", f"analysis: step {step}: {metric.result_name} not computed, the capture of its "
                                   f"target step {metric.target_checkpoint} is not kept in {self.pending} (was it "
                                   f"deleted?)"))
        if ready:
            results = analyze(only(self.spec, ready), step, dynamics, self.targets, self.model, device=self.device)
            with self.writing():
                write_results(self.run_dir, self.spec.analysis_name, step, results)
                report(("result", step, flat_scalars(results)))
        return later

    def _keep_target(self, step: int, dynamics: Dynamics) -> None:
        """A target step's share, kept before anything depends on it."""
        self.targets[step] = _kept(dynamics, only(self.spec, [metric for metric in self.spec.metrics
                                                               if metric.target_checkpoint == step]))
        save_pending(self.pending / f"target_{step}.pt", step, [], self.targets[step])

    def step(self, step: int, dynamics: Dynamics, report: Callable) -> None:
        """Analyze one capture; `report` gets ("result", step, scalars) and ("warning", line) messages."""
        self.pending.mkdir(parents=True, exist_ok=True)
        if step in self.target_steps:
            self._keep_target(step, dynamics)
        self._analyze(step, self._todo(step, {metric.result_name for metric in self.spec.metrics}), dynamics, report,
                      set())
        if step in self.target_steps:
            self.complete_pending(report)

    def complete_pending(self, report: Callable) -> None:
        """Every pending step's owed metrics that can be computed now; a file owing nothing more is deleted, one
        whose rest waits for a later target keeps only what that reads. A target step a stop left queued is kept as
        a target first."""
        for step in sorted(self.target_steps & set(_pending_steps(self.pending))):
            if self._target(step) is None:
                self._keep_target(step, read_checkpoint_file(self.pending / f"step_{step}.pt")["dynamics"])
        for step in _pending_steps(self.pending):
            path = self.pending / f"step_{step}.pt"
            saved = read_checkpoint_file(path)
            todo = self._todo(step, set(saved["owes"]))
            if not self._analyze(step, todo, saved["dynamics"], report, set(saved["owes"])):
                path.unlink()


@contextmanager
def _no_stop():
    yield


class _Stopped(BaseException):
    """SIGTERM in the worker: unwinds the analysis (not caught as a step's failure) and ends the process cleanly."""


def _stop_between_writes(analyst: Analyst) -> None:
    """SIGTERM raises _Stopped at once, or, inside a result's write and report, right after it."""
    state = {"writing": False, "asked": False}

    def on_term(signum, frame) -> None:  # noqa: ANN001
        state["asked"] = True
        if not state["writing"]:
            raise _Stopped

    @contextmanager
    def writing():
        state["writing"] = True
        try:
            yield
        finally:
            state["writing"] = False
        if state["asked"]:
            raise _Stopped

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    analyst.writing = writing


def work(raw_spec: dict, source: str, run_dir: Path, model: ModelConfig, device: str, tasks, results  # noqa: ANN001
         ) -> None:
    """The background process: analyze each (step, buffer, layout) from `tasks` until None; send ("result", step,
    scalars), ("warning", line) and ("done", step) to `results`."""
    os.nice(WORKER_NICENESS)
    torch.set_num_threads(WORKER_THREADS)
    analyst = Analyst(parse_analysis(raw_spec, source), run_dir, model, torch.device(device))
    if analyst.device.type == "cuda":
        total = torch.cuda.get_device_properties(analyst.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, GPU_MEMORY_BUDGET_GIB * 2**30 / total), analyst.device)
    _stop_between_writes(analyst)
    for leftover in analyst.pending.glob(".*.tmp-*"):  # a write the stopped run was killed in
        leftover.unlink()

    def attempt(what: str, job: Callable, *args: object) -> None:
        try:
            job(*args, results.put)
        except Exception as err:  # one step's failure (a damaged pending file, a missing tensor) is one warning
            results.put(("warning", f"analysis: {what} failed ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:200] if str(err) else ''}); training goes on "
                                    f"without it"))

    try:
        attempt("completing the pending steps", analyst.complete_pending)
        while (task := tasks.get()) is not None:
            step, buffer, layout = task
            attempt(f"step {step}", analyst.step, step, unpacked(buffer, layout))
            del task, buffer
            results.put(("done", step))
    except _Stopped:  # the runner persists what is not done; the queue's messages are flushed as the process ends
        pass
