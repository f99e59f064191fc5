"""Graceful stop: SIGTERM (what a cluster or DeepSpeed's launcher sends before killing), SIGINT (Ctrl-C) and SIGUSR1
(SLURM's `--signal=B:USR1@120`, sent early) only set a flag. At the end of every step the ranks OR their flags in
one small all-reduce on a CPU (gloo) group, so the check never synchronises the GPU and every rank stops after the
same step, even when the signal reached only some of them; the trainer then saves that step and exits 0.
"""

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignal:
    def __init__(self) -> None:
        """Collective: every rank creates the CPU group at the same point."""
        self.received: str | None = None
        self.group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001
        self.received = signal.Signals(signum).name

    def agreed(self) -> str | None:
        """The signal any rank received (its name, or "a signal on another rank"), or None; collective."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not flag.numpy()[0]:  # a CPU tensor: reading it waits for nothing on the device
            return None
        return self.received or "a signal on another rank"

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
