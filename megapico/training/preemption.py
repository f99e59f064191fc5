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
has no launcher above it and is unchanged.
"""

import os
import signal
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

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


class StopSignal:
    def __init__(self) -> None:
        """Collective: every rank creates the CPU group at the same point."""
        self.received: str | None = None
        self.group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        self.watch = LauncherWatch()

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001
        self.received = f"{signal.Signals(signum).name} received"

    def agreed(self) -> str | None:
        """Why to stop ("SIGTERM received", "the deepspeed runner (pid N) is gone", or "a stop on another rank"
        when only another rank knows), or None; collective."""
        if self.received is None:
            self.received = self.watch.gone()
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not flag.numpy()[0]:  # a CPU tensor: reading it waits for nothing on the device
            return None
        return self.received or "a stop on another rank"

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
