"""Graceful stop, wherever the signal lands.

SIGTERM (what a cluster or DeepSpeed's per-node launcher sends before killing), SIGINT (Ctrl-C) and SIGUSR1
(SLURM's `--signal=B:USR1@120`, sent early) only set a flag. A launcher that is gone sets it too: at start each
rank records the launcher processes above it (DeepSpeed's per-node `deepspeed.launcher.launch` and the `deepspeed`
runner above that, torchrun's agent, SLURM's slurmstepd, Open MPI's mpirun/orted/prted), and at the end of every
step checks that each still runs (a look at the process table: a few microseconds, no GPU sync). DeepSpeed's
runner forwards no signal on one node and dies of SIGTERM; a SIGKILLed launcher forwards nothing at all; either
way the ranks would otherwise train on without it. At the end of every step the ranks OR their flags in one small
all-reduce on a CPU (gloo) group, so every rank stops after the same step even when the signal (or the loss of a
launcher) reached only some of them; the trainer then saves that step and exits 0. Plain `python pretrain.py`
has no launcher above it and is unchanged. Once the ranks agree to stop, rank 0 notes it in the run's lock
(megapico/checkpoint/run_lock.py) before the save: a launcher hands the prompt back within seconds while the ranks
still save, and the same command given then waits for them instead of being refused as a second run.

A launcher can also take the console with it: Open MPI's mpirun forwards its ranks' output through pipes it reads
itself, so once it is SIGKILLed the ranks' next print raises BrokenPipeError and would end them before they save.
At the same step end the ranks look at their standard output and error (a poll of the two descriptors, no
write), and a stream whose reader is gone is pointed at `{run dir}/console_rank{R}.log` (the descriptor itself, so
C++ writes follow), where the rest of that rank's output, the stop's own line included, lands.
"""

import os
import select
import signal
import sys
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from megapico.checkpoint.run_lock import record_stop

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
LAUNCHER_MODULES = {  # a name in a process's command line -> what it is
    "deepspeed.launcher.launch": "DeepSpeed's per-node launcher", "deepspeed/launcher/launch.py":
        "DeepSpeed's per-node launcher", "deepspeed.launcher.runner": "the deepspeed runner",
    "deepspeed/launcher/runner.py": "the deepspeed runner", "torch.distributed.run": "torchrun's agent",
    "torch/distributed/run.py": "torchrun's agent",
}
LAUNCHER_PROGRAMS = {"deepspeed": "the deepspeed runner", "torchrun": "torchrun's agent",
                     "slurmstepd": "SLURM's slurmstepd", "srun": "SLURM's srun", "mpirun": "Open MPI's mpirun",
                     "mpiexec": "Open MPI's mpiexec", "orterun": "Open MPI's orterun", "orted": "Open MPI's orted",
                     "prterun": "Open MPI's prterun", "prted": "Open MPI's prted"}


def launcher_kind(process: psutil.Process) -> str | None:
    """What launcher `process` is, from its command line (None: not one, e.g. a shell)."""
    try:
        arguments = process.cmdline()
    except (psutil.Error, OSError):
        return None
    for argument in arguments[:3]:  # the program, or python and its script / -m module
        if Path(argument).name in LAUNCHER_PROGRAMS:
            return LAUNCHER_PROGRAMS[Path(argument).name]
    for argument in arguments[:4]:
        for module, kind in LAUNCHER_MODULES.items():
            if argument == module or argument.endswith(module):
                return kind
    return None


class LauncherWatch:
    """The launchers above this process, each known by pid and start time (a reused pid is not mistaken for it)."""

    def __init__(self) -> None:
        self.launchers: list[tuple[psutil.Process, str]] = []
        try:
            process = psutil.Process(os.getpid()).parent()
            while process is not None and (kind := launcher_kind(process)) is not None:
                self.launchers.append((process, kind))
                process = process.parent()
        except (psutil.Error, OSError):  # no process table to read: watch nothing, as before
            pass

    def gone(self) -> str | None:
        """A description of the first watched launcher that no longer runs (exited, killed, a zombie), or None."""
        for process, kind in self.launchers:
            try:
                running = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                running = False
            if not running:
                return f"{kind} (pid {process.pid}) is gone"
        return None


def reader_is_gone(descriptor: int) -> bool:
    """Whether a write to `descriptor` would fail with EPIPE: a pipe or socket whose reading end has closed. A file
    or a terminal is never gone. poll() reports it as POLLERR/POLLHUP without writing anything."""
    poller = select.poll()
    poller.register(descriptor, select.POLLOUT)
    try:
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except OSError:
        return False


def keep_the_console(log_path: Path) -> list[str]:
    """Point standard output and error at `log_path` (appended to) if their reader is gone; the names of the
    streams moved. Python's stream objects keep their descriptors, so every later print follows."""
    moved = []
    for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
        try:
            descriptor = stream.fileno()
        except (AttributeError, OSError, ValueError):  # replaced by something that is not a file (a test capture)
            continue
        if not reader_is_gone(descriptor):
            continue
        try:
            stream.flush()
        except OSError:  # the bytes still buffered for the lost reader go with it
            pass
        log_path.parent.mkdir(parents=True, exist_ok=True)
        target = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, descriptor)
        os.close(target)
        moved.append(name)
    return moved


class StopSignal:
    def __init__(self, run_dir: Path | None = None) -> None:
        """Collective: every rank creates the CPU group at the same point. `run_dir`: where a rank's output goes
        once its console is gone (console_rank{R}.log), and whose lock rank 0 marks on a stop; None leaves both
        alone."""
        self.received: str | None = None
        self.group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        self.watch = LauncherWatch()
        self.console_log = run_dir / f"console_rank{dist.get_rank()}.log" if run_dir is not None else None
        self.lock_dir = run_dir if dist.get_rank() == 0 else None  # rank 0 holds the run's lock

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001
        self.received = f"{signal.Signals(signum).name} received"

    def agreed(self) -> str | None:
        """Why to stop ("SIGTERM received", "the deepspeed runner (pid N) is gone", or "a stop on another rank"
        when only another rank knows), or None; collective."""
        if self.received is None:
            self.received = self.watch.gone()
        if self.console_log is not None and (moved := keep_the_console(self.console_log)):
            print(f"{' and '.join(moved)} lost their reader (the launcher that forwarded them is gone?); this "
                  f"rank's output continues here", flush=True)
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not flag.numpy()[0]:  # a CPU tensor: reading it waits for nothing on the device
            return None
        why = self.received or "a stop on another rank"
        if self.lock_dir is not None:
            record_stop(self.lock_dir, why)
        return why

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
