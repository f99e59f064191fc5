"""One run per run directory.

A double submit, or a requeue while the old job still runs, would otherwise put two trainings into one directory,
both writing step_N over each other. Rank 0 holds `runs/RUN/.megapico-lock` for the run's lifetime: a JSON record
of the holder (host, pid, the process's start time, its boot and pid namespace, since when, how stale its heartbeat
may grow) and a heartbeat it refreshes at step ends. A launch that finds the lock held by a live run is refused with
one line naming the holder, before it changes anything. A holder that is gone is taken over with a warning: where
its process is visible (same host, same boot, same pid namespace), when that process no longer runs or the pid now
belongs to another one; elsewhere (another node on a shared filesystem, another container), when its heartbeat is
older than the holder said it may grow.

The lock file is created whole with os.link (it fails if the name exists), so two launches started together never
both win; a takeover first renames the stale file away, which only one contender can do.
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
STALE_S = 600.0  # ten missed heartbeats: a run whose node went away, not one in a long checkpoint save


class RunLockedError(RuntimeError):
    """The run directory is held by a live run; the message is one line naming it."""


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _where() -> str:
    """This process's host, boot and pid namespace: a holder's pid means something only where all three match."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, namespace = "", 0
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _holder_is_gone(holder: dict, now: float) -> str | None:
    """Why the recorded holder no longer holds the run (None while it does)."""
    if holder.get("where") == _where():
        started = _process_started(int(holder.get("pid", -1)))
        if started is None:
            return f"its process {holder.get('pid')} is gone"
        if abs(started - float(holder.get("process_started", started))) > 1.0:
            return f"pid {holder.get('pid')} now belongs to another process"
        return None
    age = now - float(holder.get("heartbeat", 0))
    return f"its heartbeat is {age / 60:.0f} min old" if age > float(holder.get("stale_s", STALE_S)) else None


class RunLock:
    """Held by rank 0 from before the run directory is touched until the run ends. `stale_s`: how old this run's
    heartbeat may grow before another node may take the lock (longer than any pause between step ends)."""

    def __init__(self, run_dir: Path, stale_s: float = STALE_S) -> None:
        self.path = run_dir / LOCK_FILE
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "where": _where(),
                       "process_started": _process_started(os.getpid()), "stale_s": max(stale_s, STALE_S),
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.last_beat = 0.0
        self.beat_failed = False

    def _create(self) -> bool:
        """Create the lock file whole, holding this record; False if the name exists."""
        tmp = self.path.with_name(f"{LOCK_FILE}.new-{os.getpid()}")
        tmp.write_text(json.dumps({**self.record, "heartbeat": time.time()}))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a gone holder was taken over, raises RunLockedError when a live
        one holds it. The run directory is created here if needed (the caller removes it if the start fails)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        taken_over = None
        for _ in range(5):
            if self._create():
                self.last_beat = time.time()
                return taken_over
            holder = self._read(self.path)
            gone = _holder_is_gone(holder, time.time()) if holder else "its lock file is unreadable"
            if gone is None:
                raise RunLockedError(
                    f"{self.path.parent}: held by a live run (host {holder.get('host')}, pid {holder.get('pid')}, "
                    f"since {holder.get('since')}); stop it first, or choose another checkpointing.run_name")
            stale = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
            try:
                os.rename(self.path, stale)  # one contender wins this; the others find the name gone or new
            except FileNotFoundError:
                continue
            if self._read(stale) != holder:  # another contender's fresh lock, not the stale one judged: give it back
                try:
                    os.link(stale, self.path)
                except FileExistsError:
                    pass
                stale.unlink(missing_ok=True)
                continue
            stale.unlink(missing_ok=True)
            taken_over = (f"{self.path}: taking over from host {holder.get('host')}, pid {holder.get('pid')} (since "
                          f"{holder.get('since')}): {gone}")
        raise RunLockedError(f"{self.path.parent}: its lock is contended by other launches; launch one run at a time")

    def beat(self) -> str | None:
        """Refresh the heartbeat (at most one write per HEARTBEAT_S); a failed write (a full or flaky shared
        filesystem) is a warning, returned once, never the end of the run."""
        now = time.time()
        if now - self.last_beat < HEARTBEAT_S:
            return None
        self.last_beat = now
        try:
            write_text(self.path, json.dumps({**self.record, "heartbeat": now}))
        except OSError as err:
            if not self.beat_failed:
                self.beat_failed = True
                return f"{self.path}: heartbeat not written ({err}); another node may take the run over"
        return None

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        holder = self._read(self.path)
        if holder.get("pid") == os.getpid() and holder.get("where") == self.record["where"]:
            self.path.unlink(missing_ok=True)
