"""pico-analyze's metrics of every learning-dynamics capture, computed beside the training ranks on rank 0: a step
never waits for them.

submit() returns at once: a thread of the runner copies what the spec reads of the capture into one shared-memory
buffer (one memcpy, one file descriptor; no disk copy) for one background process (torch.multiprocessing, spawn;
megapico/training/analysis_worker.py), so the capture is the runner's once submitted. That process, niced, at
WORKER_THREADS threads, on the device analysis_device picks, writes `analysis_results/<analysis_name>/step_N/`
(megapico.analysis: each file once, atomically) and sends the scalars back for metrics.jsonl and wandb (poll()). Any
failure is one warning and training goes on.

What is not analyzed when the runner closes (a stop: at once; the end of training: after wait_at_end_s; a worker
that died) is not lost: the runner keeps each capture until the worker reports it done, and close() writes every
one still queued or in progress into analysis_pending/step_N.pt (what the spec reads, owing every metric; each file
whole or absent), after the worker has stopped, in step order. The next launch's worker completes them at start
(analysis_worker.py), writing each result once. That costs the stop one file write per queued capture, after the
checkpoint is saved: a kill during it loses only the files not yet renamed.
"""

import queue
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megapico.analysis.metrics import CPU, LAYER_KEY, Dynamics
from megapico.analysis.spec import AnalysisSpec, MetricSpec
from megapico.checkpoint.paths import inside
from megapico.config import ModelConfig
from megapico.training.analysis_worker import PENDING_DIR, Scalars, save_pending, unpacked, work

STOP_WAIT_S = 30.0  # a stopped worker ends within one torch operation (one SVD); killed if it takes longer


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


def read_by(spec: AnalysisSpec) -> set[tuple[str, str, str]]:
    """(split, kind, suffix) the spec's metrics may read of a capture (an ov_circuit component reads both of its
    layers' weights besides its data type): the rest of a capture is neither sent to the worker nor kept."""
    read = set()
    for metric in spec.metrics:
        for component in metric.components:
            if component.component_name == "simple":
                read.add((metric.data_split, component.data_type, component.layer_suffixes))
                continue
            for suffix in component.layer_suffixes.values():
                read |= {(metric.data_split, kind, suffix) for kind in {component.data_type, "weights"}}
    return read


def _selected(dynamics: Dynamics, read: set[tuple[str, str, str]]) -> list[tuple[str, str, str, torch.Tensor]]:
    """(split, kind, key, tensor) of the capture that `read` names."""
    return [(split, kind, key, tensor) for split, kinds in dynamics.items() for kind, named in kinds.items()
            for key, tensor in named.items()
            if (match := LAYER_KEY.match(key)) and (split, kind, key[match.end():]) in read]


def _packed(dynamics: Dynamics, read: set[tuple[str, str, str]]) -> tuple[torch.Tensor, list[tuple]]:
    """The tensors the spec reads, copied into one shared-memory buffer (one file descriptor per capture, however
    many tensors), and where each lies in it: (split, kind, key, dtype, shape, offset)."""
    layout, size = [], 0
    selected = _selected(dynamics, read)
    for split, kind, key, tensor in selected:
        layout.append((split, kind, key, tensor.dtype, tuple(tensor.shape), size))
        size += -(-tensor.numel() * tensor.element_size() // 8) * 8  # 8-byte aligned, for any dtype
    buffer = torch.empty(size, dtype=torch.uint8).share_memory_()
    views = unpacked(buffer, layout)
    for split, kind, key, tensor in selected:
        views[split][kind][key].copy_(tensor)
    return buffer, layout


class AnalysisRunner:
    """Rank 0's: pico-analyze's metrics of every capture, computed off the training path; a step never waits."""

    def __init__(self, spec: AnalysisSpec, run_dir: Path, model: ModelConfig,
                 device: torch.device = CPU) -> None:
        """`device`: the worker's (analysis_worker.analysis_device's choice)."""
        context = mp.get_context("spawn")
        self._tasks, self._results = context.Queue(), context.Queue()
        self._read, self._names = read_by(spec), [metric.result_name for metric in spec.metrics]
        self._pending = inside(Path(run_dir), Path(run_dir) / PENDING_DIR)
        self._process = context.Process(target=work, name="megapico-analysis", daemon=True,
                                        args=(_raw(spec), spec.source, Path(run_dir), model, str(device),
                                              self._tasks, self._results))
        self._process.start()
        self._held: dict[int, Dynamics] = {}  # submitted, not yet done: the capture (or its shared-memory views)
        self._dead = self._closing = False
        self._packing: queue.SimpleQueue = queue.SimpleQueue()  # steps to copy into shared memory, then None
        self._packer = threading.Thread(target=self._pack, name="megapico-analysis-submit", daemon=True)
        self._packer.start()

    def _pack(self) -> None:
        """The submitting thread: the copy into shared memory happens here, beside the training loop (which, on
        a GPU, mostly waits on the device), not in it."""
        while (step := self._packing.get()) is not None:
            try:
                if not (self._closing or self._dead):
                    buffer, layout = _packed(self._held[step], self._read)
                    self._held[step] = unpacked(buffer, layout)  # the same tensors, now in shared memory
                    self._tasks.put((step, buffer, layout))
            except Exception as err:  # not a capture ({split: {kind: {key: tensor}}}): one warning, the rest go on
                self._held.pop(step, None)
                print(f"warning: analysis: step {step} not analyzed, its capture could not be copied "
                      f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})", flush=True)

    def submit(self, step: int, dynamics: Dynamics) -> None:
        """Queue a capture ({split: {kind: {key: tensor}}}, the runner's from now on: not to be changed) and return."""
        if self._dead:
            return
        self._held[step] = dynamics
        self._packing.put(step)

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
                self._held.pop(message[1], None)

    def _gone(self, why: str) -> None:
        """The worker is no more: say once what is left unanalyzed, and let the queues go without waiting."""
        if not self._dead:
            self._dead = True
            print(f"warning: analysis: {why}; training goes on without analysis", flush=True)
            self._tasks.cancel_join_thread()
            self._results.cancel_join_thread()

    def poll(self) -> list[tuple[int, Scalars]]:
        """(step, scalars) written since the last poll, to log at that step; a dead worker is one warning."""
        finished = self._drain()
        if not self._dead and not self._process.is_alive():
            finished += self._drain()
            self._gone(f"the background process died (exit code {self._process.exitcode})")
        return finished

    def _wait(self, deadline: float) -> list[tuple[int, Scalars]]:
        """Results until the worker ends or the deadline passes (draining keeps its queue from filling up)."""
        finished = []
        while self._process.is_alive() and time.monotonic() < deadline:
            finished += self._drain()
            self._process.join(0.05)
        return finished + self._drain()

    def close(self, timeout_s: float) -> list[tuple[int, Scalars]]:
        """Wait up to timeout_s for what was submitted (0: a stop), return what finished; then stop the worker (every
        file it wrote is whole, every result it wrote is returned) and keep what it did not finish in the pending
        area for the next launch."""
        finished, deadline = [], time.monotonic() + timeout_s
        self._packing.put(None)
        if not self._dead and timeout_s > 0:
            self._packer.join(timeout_s)
            self._tasks.put(None)
            finished += self._wait(deadline)
        self._closing = True
        self._packer.join()  # at most the copy of one capture
        if not self._dead:
            if self._process.is_alive():
                self._process.terminate()  # the worker stops between writes (analysis_worker.py)
                finished += self._wait(time.monotonic() + STOP_WAIT_S)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            if timeout_s > 0 and self._process.exitcode:
                self._gone(f"the background process died (exit code {self._process.exitcode})")
            elif timeout_s > 0 and self._held:
                self._gone(f"still working after {timeout_s:g} s at the end; stopped")
            self._dead = True
        self._keep_unfinished()
        return finished

    def _keep_unfinished(self) -> None:
        """Each capture not done into analysis_pending/step_N.pt, owing every metric (what is on disk is skipped)."""
        if self._held:
            print(f"analysis: step{'s' * (len(self._held) > 1)} {', '.join(map(str, sorted(self._held)))} not "
                  f"analyzed yet: kept in {self._pending} for the next launch of the same command", flush=True)
        for step in sorted(self._held):
            kept: dict = {}
            for split, kind, key, tensor in _selected(self._held.pop(step), self._read):
                kept.setdefault(split, {}).setdefault(kind, {})[key] = tensor.clone()  # its own storage, not a view
            self._pending.mkdir(parents=True, exist_ok=True)
            save_pending(self._pending / f"step_{step}.pt", step, self._names, kept)
