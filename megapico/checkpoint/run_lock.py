"""One run per run directory.

A double submit, or a requeue while the old job still runs, would otherwise put two trainings into one directory,
both writing step_N over each other. Rank 0 holds `runs/RUN/.megapico-lock` for the run's lifetime: a JSON record
of the holder (host, pid, the process's start time, since when) and a heartbeat it refreshes at step ends. A launch
that finds the lock held by a live run is refused with one line naming the holder, before it changes anything. A
holder that is gone is taken over with a warning: on this host, when its process no longer runs (or the pid now
belongs to another process); on another host (a shared filesystem), when its heartbeat is older than STALE_S.
"""

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from megapico.checkpoint.paths import write_text

LOCK_FILE = ".megapico-lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0  # ten missed heartbeats: a run whose host went away, not one in a long checkpoint save


class RunLockedError(RuntimeError):
    """The run directory is held by a live run; the message is one line naming it."""


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _holder_is_gone(holder: dict, now: float) -> str | None:
    """Why the recorded holder no longer holds the run (None while it does)."""
    if holder.get("host") == socket.gethostname():
        started = _process_started(int(holder.get("pid", -1)))
        if started is None:
            return f"its process {holder.get('pid')} is gone"
        if abs(started - float(holder.get("process_started", started))) > 1.0:
            return f"pid {holder.get('pid')} now belongs to another process"
        return None
    age = now - float(holder.get("heartbeat", 0))
    return f"its heartbeat is {age / 60:.0f} min old" if age > STALE_S else None


class RunLock:
    """Held by rank 0 from before the run directory is touched until the run ends."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "process_started": _process_started(os.getpid()),
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.last_beat = 0.0

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a gone holder was taken over, raises RunLockedError when a live
        one holds it. The run directory is created here if needed (the caller removes it if the start fails)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(self.path.read_text())
            except (OSError, ValueError):
                holder = {}
            gone = _holder_is_gone(holder, now) if holder else "its lock file is unreadable"
            if gone is None:
                raise RunLockedError(
                    f"{self.path.parent}: held by a live run (host {holder.get('host')}, pid {holder.get('pid')}, "
                    f"since {holder.get('since')}); stop it first, or choose another checkpointing.run_name") from None
            self.beat(force=True)
            return (f"{self.path}: taking over from host {holder.get('host')}, pid {holder.get('pid')} (since "
                    f"{holder.get('since')}): {gone}")
        os.close(descriptor)
        self.beat(force=True)
        return None

    def beat(self, force: bool = False) -> None:
        """Refresh the heartbeat (rate-limited to one write per HEARTBEAT_S)."""
        now = time.time()
        if force or now - self.last_beat >= HEARTBEAT_S:
            write_text(self.path, json.dumps({**self.record, "heartbeat": now}))
            self.last_beat = now

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
