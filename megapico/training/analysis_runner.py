"""pico-analyze's metrics of every learning-dynamics capture, computed beside the training ranks on rank 0: a step
never waits for them.

submit() returns at once: a thread of the runner copies what the spec reads of the capture into one shared-memory
buffer (one memcpy, one file descriptor; no disk copy) for one background process (torch.multiprocessing, spawn),
so the capture is the runner's once submitted. That process, niced and at WORKER_THREADS threads, writes
`analysis_results/<analysis_name>/step_N/` (megapico.analysis: each file once, atomically) and sends the scalars
back for metrics.jsonl and wandb (poll()). Any failure is one warning and training goes on.

Comparative metrics (cka, pwcca) compare a step with a target step's capture. A step captured before its target
keeps only what they read (needed_for_targets, never a checkpoint's worth) in `analysis_pending/step_N.pt`; the
target keeps its share in `analysis_pending/target_T.pt` for every later step. When the target is captured, each
pending step's owed metrics are written and its file deleted: a finished run's results equal pico-analyze's.

Stops: results and pending files are written to a temporary and renamed (whole or absent); a step's pending file
is written before its results, a target's file before the pending steps are completed. A new runner on the same
run directory completes at start the pending steps whose target is kept, the rest when their target is
submitted; owed_steps() lists what is owed. A step's files on disk are neither recomputed nor returned again, so
a resumed run's metrics.jsonl has no duplicates.
"""

import dataclasses
import os
import queue
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megapico.analysis.metrics import LAYER_KEY, Dynamics, analyze, needed_for_targets
from megapico.analysis.results import existing_results, flat_scalars, write_results
from megapico.analysis.spec import AnalysisSpec, MetricSpec, parse_analysis
from megapico.checkpoint.files import read_checkpoint_file
from megapico.checkpoint.paths import inside, replacing
from megapico.config import ModelConfig

PENDING_DIR = "analysis_pending"
STEP_FILE = re.compile(r"step_(\d+)\.pt")
# The worker's threads: a quarter of its share of the node beside 8 training ranks, 1 to 4 (a CPU run on a laptop
# gets 1; an A100 node's 64-128 cores give 4, enough for one capture's SVDs well within 100 steps)
WORKER_THREADS = max(1, min(4, (os.cpu_count() or 1) // 32))
WORKER_NICENESS = 10  # the OS serves the training ranks first when the cores are busy
Scalars = dict[str, float]


def _raw(spec: AnalysisSpec) -> dict:
    """The spec as pico-analyze's YAML mapping (a frozen spec holds mapping proxies, which do not pickle)."""
    def metric(item: MetricSpec) -> dict:
        extra = {"target_checkpoint": item.target_checkpoint} if item.comparative else {}
        extra |= {"norm_type": item.norm_type} if item.norm_type is not None else {}
        return {"metric_name": item.metric_name, "data_split": item.data_split, **extra, "components": [
            {"component_name": part.component_name, "data_type": part.data_type, "layers": list(part.layers),
             "layer_suffixes": part.layer_suffixes if isinstance(part.layer_suffixes, str)
             else dict(part.layer_suffixes)} for part in item.components]}

    return {"analysis_name": spec.analysis_name, "metrics": [metric(item) for item in spec.metrics]}


def _only(spec: AnalysisSpec, metrics: list[MetricSpec]) -> AnalysisSpec:
    return dataclasses.replace(spec, metrics=tuple(metrics))


def _kept(dynamics: Dynamics, spec: AnalysisSpec) -> dict:
    """What the comparative metrics of `spec` read of a capture (every layer of each needed suffix)."""
    kept: dict = {}
    for split, kind, suffix in sorted(needed_for_targets(spec)):
        for key, tensor in dynamics[split][kind].items():
            match = LAYER_KEY.match(key)
            if match and key[match.end():] == suffix:
                kept.setdefault(split, {}).setdefault(kind, {})[key] = tensor.clone()
    return kept


def _save(path: Path, step: int, dynamics: Mapping) -> None:
    with replacing(path) as tmp:
        torch.save({"step": step, "dynamics": dynamics}, tmp)


def _pending_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(match[1]) for path in directory.iterdir() if (match := STEP_FILE.fullmatch(path.name)))


def _owed(spec: AnalysisSpec, run_dir: Path, step: int) -> list[MetricSpec]:
    """The comparative metrics of `step` not yet on disk."""
    written = existing_results(run_dir, spec.analysis_name, step)
    return [metric for metric in spec.metrics if metric.comparative and metric.result_name not in written]


def owed_steps(spec: AnalysisSpec, run_dir: Path) -> list[int]:
    """Steps whose comparative metrics are still owed: kept in analysis_pending/ until their target is captured."""
    run_dir = Path(run_dir)
    return [step for step in _pending_steps(run_dir / PENDING_DIR) if _owed(spec, run_dir, step)]


class Analyst:
    """The worker's state: which targets it holds, what each step still owes. Runs in the background process (and
    in tests, directly)."""

    def __init__(self, spec: AnalysisSpec, run_dir: Path, model: ModelConfig) -> None:
        self.spec, self.run_dir, self.model = spec, Path(run_dir), model
        self.pending = inside(self.run_dir, self.run_dir / PENDING_DIR)
        self.targets: dict[int, Dynamics] = {}
        self.target_steps = {metric.target_checkpoint for metric in spec.metrics if metric.comparative}

    def _target(self, step: int) -> Dynamics | None:
        path = self.pending / f"target_{step}.pt"
        if step not in self.targets and path.is_file():
            self.targets[step] = read_checkpoint_file(path)["dynamics"]
        return self.targets.get(step)

    def _write(self, step: int, metrics: list[MetricSpec], dynamics: Dynamics) -> tuple[int, Scalars]:
        results = analyze(_only(self.spec, metrics), step, dynamics, self.targets, self.model)
        write_results(self.run_dir, self.spec.analysis_name, step, results)
        return step, flat_scalars(results)

    def step(self, step: int, dynamics: Dynamics) -> tuple[list[tuple[int, Scalars]], list[str]]:
        """Analyze one capture: ((step, scalars) written, warnings)."""
        done, warnings = [], []
        self.pending.mkdir(parents=True, exist_ok=True)
        if step in self.target_steps:  # kept before anything depends on it
            self.targets[step] = _kept(dynamics, _only(self.spec, [metric for metric in self.spec.metrics
                                                                    if metric.target_checkpoint == step]))
            _save(self.pending / f"target_{step}.pt", step, self.targets[step])
        written = existing_results(self.run_dir, self.spec.analysis_name, step)
        todo = [metric for metric in self.spec.metrics if metric.result_name not in written]
        ready = [metric for metric in todo
                 if not metric.comparative or self._target(metric.target_checkpoint) is not None]
        later = [metric for metric in todo if metric not in ready and metric.target_checkpoint > step]
        lost = [metric for metric in todo if metric not in ready and metric.target_checkpoint < step]
        if later:
            _save(self.pending / f"step_{step}.pt", step, _kept(dynamics, _only(self.spec, later)))
        for metric in lost:
            warnings.append(f"analysis: step {step}: {metric.result_name} not computed, the capture of its target "
                            f"step {metric.target_checkpoint} is not kept in {self.pending} (was it deleted?)")
        if ready:
            done.append(self._write(step, ready, dynamics))
        if step in self.target_steps:
            done += self.complete_pending()
        return done, warnings

    def complete_pending(self) -> list[tuple[int, Scalars]]:
        """Every pending step's owed metrics whose target is kept; a pending file owing nothing more is deleted."""
        done = []
        for step in _pending_steps(self.pending):
            path = self.pending / f"step_{step}.pt"
            owed = _owed(self.spec, self.run_dir, step)
            ready = [metric for metric in owed if self._target(metric.target_checkpoint) is not None]
            if ready:
                done.append(self._write(step, ready, read_checkpoint_file(path)["dynamics"]))
            if len(ready) == len(owed):
                path.unlink()
        return done


def _work(raw_spec: dict, source: str, run_dir: Path, model: ModelConfig, tasks, results) -> None:  # noqa: ANN001
    """The background process: analyze each (step, dynamics) from `tasks` until None; send ("result", step,
    scalars), ("warning", line) and ("done", step) to `results`."""
    os.nice(WORKER_NICENESS)
    torch.set_num_threads(WORKER_THREADS)
    analyst = Analyst(parse_analysis(raw_spec, source), run_dir, model)
    for leftover in analyst.pending.glob(".*.tmp-*"):  # a write the stopped run was killed in
        leftover.unlink()

    def attempt(what: str, work, *args: object) -> None:  # noqa: ANN001
        try:
            done, warnings = work(*args)
        except Exception as err:  # one step's failure (a damaged pending file, a missing tensor) is one warning
            done, warnings = [], [f"analysis: {what} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}"
                                  f"); training goes on without it"]
        for step, scalars in done:
            results.put(("result", step, scalars))
        for line in warnings:
            results.put(("warning", line))

    attempt("completing the pending steps", lambda: (analyst.complete_pending(), []))
    while (task := tasks.get()) is not None:
        step, buffer, layout = task
        attempt(f"step {step}", analyst.step, step, _unpacked(buffer, layout))
        del task, buffer
        results.put(("done", step))


def _read_by(spec: AnalysisSpec) -> set[tuple[str, str, str]]:
    """(split, kind, suffix) the spec's metrics may read of a capture (an ov_circuit component reads both of its
    layers' weights besides its data type): the rest of a capture is not sent to the worker."""
    read = set()
    for metric in spec.metrics:
        for component in metric.components:
            if component.component_name == "simple":
                read.add((metric.data_split, component.data_type, component.layer_suffixes))
                continue
            for suffix in component.layer_suffixes.values():
                read |= {(metric.data_split, kind, suffix) for kind in {component.data_type, "weights"}}
    return read


def _packed(dynamics: Dynamics, read: set[tuple[str, str, str]]) -> tuple[torch.Tensor, list[tuple]]:
    """The tensors the spec reads, copied into one shared-memory buffer (one file descriptor per capture, however
    many tensors), and where each lies in it: (split, kind, key, dtype, shape, offset)."""
    layout, tensors, size = [], [], 0
    for split, kinds in dynamics.items():
        for kind, named in kinds.items():
            for key, tensor in named.items():
                match = LAYER_KEY.match(key)
                if match and (split, kind, key[match.end():]) in read:
                    layout.append((split, kind, key, tensor.dtype, tuple(tensor.shape), size))
                    tensors.append(tensor)
                    size += -(-tensor.numel() * tensor.element_size() // 8) * 8  # 8-byte aligned, for any dtype
    buffer = torch.empty(size, dtype=torch.uint8).share_memory_()
    views = _unpacked(buffer, layout)
    for (split, kind, key, *_), tensor in zip(layout, tensors, strict=True):
        views[split][kind][key].copy_(tensor)
    return buffer, layout


def _unpacked(buffer: torch.Tensor, layout: list[tuple]) -> dict:
    """The capture's tensors as views of the buffer."""
    dynamics: dict = {}
    for split, kind, key, dtype, shape, offset in layout:
        view = buffer[offset:offset + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
        dynamics.setdefault(split, {}).setdefault(kind, {})[key] = view
    return dynamics


class AnalysisRunner:
    """Rank 0's: pico-analyze's metrics of every capture, computed off the training path; a step never waits."""

    def __init__(self, spec: AnalysisSpec, run_dir: Path, model: ModelConfig) -> None:
        context = mp.get_context("spawn")
        self._tasks, self._results = context.Queue(), context.Queue()
        self._read = _read_by(spec)
        self._process = context.Process(target=_work, name="megapico-analysis", daemon=True,
                                        args=(_raw(spec), spec.source, Path(run_dir), model, self._tasks,
                                              self._results))
        self._process.start()
        self._waiting: list[int] = []  # submitted, not yet done
        self._dead = False
        self._packing: queue.SimpleQueue = queue.SimpleQueue()  # captures to copy into shared memory, then None
        self._packer = threading.Thread(target=self._pack, name="megapico-analysis-submit", daemon=True)
        self._packer.start()

    def _pack(self) -> None:
        """The submitting thread: the copy into shared memory happens here, beside the training loop (which, on
        a GPU, mostly waits on the device), not in it."""
        while (task := self._packing.get()) is not None:
            step, dynamics = task
            try:
                if not self._dead:
                    self._tasks.put((step, *_packed(dynamics, self._read)))
            except Exception as err:  # not a capture ({split: {kind: {key: tensor}}}): one warning, the rest go on
                self._waiting.remove(step)
                print(f"warning: analysis: step {step} not analyzed, its capture could not be copied "
                      f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})", flush=True)
            del task, dynamics

    def submit(self, step: int, dynamics: Dynamics) -> None:
        """Queue a capture ({split: {kind: {key: tensor}}}, the runner's from now on: not to be changed) and return."""
        if self._dead:
            return
        self._packing.put((step, dynamics))
        self._waiting.append(step)

    def _drain(self) -> list[tuple[int, Scalars]]:
        finished = []
        while True:
            try:
                message = self._results.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return finished
            if message[0] == "result" and message[2]:
                finished.append((message[1], message[2]))
            elif message[0] == "warning":
                print(f"warning: {message[1]}", flush=True)
            elif message[0] == "done":
                self._waiting.remove(message[1])

    def _gone(self, why: str) -> None:
        """The worker is no more: say once what is left unanalyzed, and let the queues go without waiting."""
        if not self._dead:
            self._dead = True
            left = f"; steps {self._waiting} left unanalyzed" if self._waiting else ""
            print(f"warning: analysis: {why}{left}; training goes on without analysis (the steps' pending files "
                  f"in {PENDING_DIR}/ are completed by a resumed run)", flush=True)
            self._tasks.cancel_join_thread()
            self._results.cancel_join_thread()

    def poll(self) -> list[tuple[int, Scalars]]:
        """(step, scalars) written since the last poll, to log at that step; a dead worker is one warning."""
        finished = self._drain()
        if not self._dead and not self._process.is_alive():
            finished += self._drain()
            self._gone(f"the background process died (exit code {self._process.exitcode})")
        return finished

    def close(self, timeout_s: float) -> list[tuple[int, Scalars]]:
        """Wait up to timeout_s for what was submitted, return what finished; stop the worker with what is left
        (every file it wrote is whole) and say what that is."""
        finished = []
        if not self._dead:
            deadline = time.monotonic() + timeout_s
            self._packing.put(None)
            self._packer.join(timeout_s)
            self._tasks.put(None)
            while self._process.is_alive() and time.monotonic() < deadline:
                finished += self._drain()
                self._process.join(0.05)
            finished += self._drain()
            if self._process.is_alive():
                self._process.terminate()
                self._process.join()
                self._gone(f"still working after {timeout_s:g} s at the end; stopped")
            elif self._process.exitcode:
                self._gone(f"the background process died (exit code {self._process.exitcode})")
            self._dead = True
        return finished
