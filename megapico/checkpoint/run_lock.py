"""One run per run directory.

A double submit, or a requeue while the old job still runs, would otherwise put two trainings into one directory,
both writing step_N over each other. Rank 0 holds `runs/RUN/.megapico-lock` for the run's lifetime: a JSON record
of the holder (host, pid, the process's start time, its boot and pid namespace, since when) and a heartbeat it
refreshes at step ends. A launch that finds the lock held by a live run is refused with one line naming the holder,
before it changes anything. A holder that is gone is taken over with a warning: where its process is visible (same
host, same boot, same pid namespace), when that process no longer runs or the pid now belongs to another one;
elsewhere (another node on a shared filesystem, another container), when its heartbeat is older than megapico's own
bound (STALE_S, plus the config's end-of-run upload wait). The record's claims are never the bound: a lock planted in
a received run directory (a huge `stale_s`, a heartbeat in the future, wrong types, a file of gigabytes) holds
nothing, and one megapico cannot read is taken over with a warning.

Every rank of a launch reads the lock before any process group exists (wait_until_free): the same command given
twice shares the rendezvous port, so a second launch that got as far as the rendezvous would meet the live run's
port (a torch traceback) or, on ranks other than 0, join its store. A holder that was stopped (a signal, its
launcher gone) records so before it saves its last step; a launch meanwhile waits for it to exit, a bounded while,
saying so, and then resumes what it saved.

The lock file is created whole with os.link (it fails if the name exists), so two launches started together never
both win; a takeover first renames the stale file away, which only one contender can do.
"""

import json
import math
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
SAVE_WAIT_S = 300.0  # how long a launch waits for a stopped run to finish saving (large saves take about a minute)
QUIET_S = 20.0  # how long ranks other than 0 wait for rank 0's line (its exit ends the launch) before saying it
POLL_S = 1.0
RECORD_BYTES = 4096  # a record is about 300 bytes; a larger file is not one megapico wrote
FIELDS = {"host": str, "pid": int, "since": str, "heartbeat": float}
OPTIONAL_FIELDS = {"where": str, "process_started": float, "state": str, "why": str, "stopping_since": str}
STOP_FIELDS = ("state", "why", "stopping_since")


class RunLockedError(RuntimeError):
    """The run directory is held by a live run; the message is one line naming it."""


def _process_started(pid: int) -> float | None:
    """When process `pid` started; None once it is gone, an exited one its parent has not reaped yet included. A
    zombie whose other threads still run is not gone: its main thread exited first, and the rest still hold its
    files and sockets (its rendezvous port) until they have ended too."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE and process.num_threads() <= 1:
            return None
        return process.create_time()
    except (psutil.Error, OSError, ValueError):
        return None


def _where() -> str:
    """This process's host, boot and pid namespace: a holder's pid means something only where all three match."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, namespace = "", 0
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _valid(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31
    return isinstance(value, str) and len(value) <= 256 and value.isprintable()  # it is printed in one line


def read_record(path: Path) -> dict:
    """The holder's record, or {} for a missing file or one megapico did not write (not JSON, another shape,
    wrong types, control characters, oversized, a link): read as data from someone else, at most RECORD_BYTES."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a planted FIFO must not block
        with os.fdopen(descriptor, "rb") as file:
            data = file.read(RECORD_BYTES + 1)
        record = json.loads(data) if len(data) <= RECORD_BYTES else None
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(record, dict):
        return {}
    if not all(_valid(record.get(key), kind) for key, kind in FIELDS.items()):
        return {}
    if not all(_valid(record[key], kind) for key, kind in OPTIONAL_FIELDS.items() if record.get(key) is not None):
        return {}
    return record


def _holder_is_gone(holder: dict, now: float, stale_s: float) -> str | None:
    """Why the recorded holder no longer holds the run (None while it does); `stale_s` is the reader's bound."""
    if holder.get("where") == _where():
        started = _process_started(holder["pid"])
        if started is None:
            return f"its process {holder['pid']} is gone"
        if holder.get("process_started") is not None and abs(started - holder["process_started"]) > 1.0:
            return f"pid {holder['pid']} now belongs to another process"
        return None
    age = now - holder["heartbeat"]
    if age > stale_s:
        return f"its heartbeat is {age / 60:.0f} min old"
    if -age > stale_s:  # no clock is that far off: not a heartbeat a run wrote
        return f"its heartbeat is {-age / 60:.0f} min in the future"
    return None


def _holder(holder: dict) -> str:
    return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"


def _refusal(run_dir: Path, holder: dict) -> str:
    """The one line for a launch into a directory `holder` (live) holds."""
    if holder.get("state") == "stopping":
        return (f"{run_dir}: its run ({_holder(holder)}) was stopped ({holder.get('why')}, at "
                f"{holder.get('stopping_since')}) and is still saving its last step; run the same command again once "
                f"pid {holder['pid']} has exited")
    return (f"{run_dir}: held by a live run ({_holder(holder)}); stop it first, or choose another "
            f"checkpointing.run_name")


def wait_until_free(run_dir: Path, stale_s: float, rank: int, wait_s: float = SAVE_WAIT_S) -> None:
    """Every rank of a launch, before any process group exists (read-only): return once no live run holds
    `run_dir` (a gone holder is left for RunLock.acquire to take over). A live run that is training is refused at
    once; one that was stopped and is saving is waited for, at most `wait_s`, and then its process too (where it
    is visible), so that its rendezvous port is free again. Rank 0 says why it waits and gives the refusal's line;
    other ranks, refused alike, wait QUIET_S first so that rank 0's exit ends the launch with one line."""
    path, deadline, last = run_dir / LOCK_FILE, None, None
    try:
        while (holder := read_record(path)) and not _holder_is_gone(holder, time.time(), stale_s):
            last = holder
            if holder.get("state") != "stopping":
                raise RunLockedError(_refusal(run_dir, holder))
            if deadline is None:
                deadline = time.monotonic() + wait_s
                if rank == 0:
                    print(f"{run_dir}: its run ({_holder(holder)}) was stopped ({holder.get('why')}, at "
                          f"{holder.get('stopping_since')}) and is saving its last step; waiting for it to exit (at "
                          f"most {wait_s:.0f} s)", flush=True)
            elif time.monotonic() > deadline:
                raise RunLockedError(_refusal(run_dir, holder) + f" (waited {wait_s:.0f} s)")
            time.sleep(POLL_S)
    except RunLockedError:
        if rank != 0:
            time.sleep(QUIET_S)
        raise
    while last is not None and last.get("where") == _where() and time.monotonic() < deadline and \
            not _holder_is_gone(last, time.time(), stale_s):  # released: its process, and its port, go next
        time.sleep(POLL_S / 10)


def record_stop(run_dir: Path, why: str) -> None:
    """Note in the lock this process holds that its run is stopping (`why`), before it saves its last step: a
    launch meanwhile then waits for it rather than being refused (wait_until_free). A lock that is not this
    process's, or that cannot be written, is left as it is."""
    path = run_dir / LOCK_FILE
    holder = read_record(path)
    if not _is_mine(holder) or holder.get("state") == "stopping":
        return
    try:
        write_text(path, json.dumps({**holder, "state": "stopping", "why": why, "stopping_since": _now()}))
    except OSError:
        pass


def _is_mine(holder: dict) -> bool:
    return bool(holder) and holder["pid"] == os.getpid() and holder.get("where") == _where()


class RunLock:
    """Held by rank 0 from before the run directory is touched until the run ends. `stale_s`: how old another
    node's heartbeat may grow before this launch takes the lock (megapico's own bound, never the record's)."""

    def __init__(self, run_dir: Path, stale_s: float = STALE_S) -> None:
        self.path = run_dir / LOCK_FILE
        self.stale_s = stale_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "where": _where(),
                       "process_started": _process_started(os.getpid()), "since": _now()}
        self.last_beat = 0.0
        self.beat_failed = False

    def _create(self) -> bool:
        """Create the lock file whole, holding this record; False if the name exists."""
        tmp = self.path.with_name(f"{LOCK_FILE}.new-{os.getpid()}")
        tmp.unlink(missing_ok=True)  # a crashed launch's, or a planted link: never written through
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as file:
            file.write(json.dumps({**self.record, "heartbeat": time.time()}))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> str | None:
        """Take the lock; returns a warning when a gone holder (or a lock file megapico cannot read) was taken
        over, raises RunLockedError when a live one holds it. The run directory is created here if needed (the
        caller removes it if the start fails)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        taken_over = None
        for _ in range(5):
            if self._create():
                self.last_beat = time.time()
                return taken_over
            holder = read_record(self.path)
            gone = _holder_is_gone(holder, time.time(), self.stale_s) if holder else "not a lock megapico wrote"
            if gone is None:
                raise RunLockedError(_refusal(self.path.parent, holder))
            stale = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
            try:
                os.rename(self.path, stale)  # one contender wins this; the others find the name gone or new
            except FileNotFoundError:
                continue
            if read_record(stale) != holder:  # another contender's fresh lock, not the stale one judged: give it back
                try:
                    os.link(stale, self.path)
                except FileExistsError:
                    pass
                stale.unlink(missing_ok=True)
                continue
            stale.unlink(missing_ok=True)
            taken_over = f"{self.path}: taking over from {_holder(holder) if holder else 'a lock file'}: {gone}"
        raise RunLockedError(f"{self.path.parent}: its lock is contended by other launches; launch one run at a time")

    def beat(self) -> str | None:
        """Refresh the heartbeat (at most one write per HEARTBEAT_S), keeping a stop that record_stop noted; a
        failed write (a full or flaky shared filesystem) is a warning, returned once, never the end of the run."""
        now = time.time()
        if now - self.last_beat < HEARTBEAT_S:
            return None
        self.last_beat = now
        current = read_record(self.path)
        stopping = {key: current[key] for key in STOP_FIELDS if key in current} if _is_mine(current) else {}
        try:
            write_text(self.path, json.dumps({**self.record, **stopping, "heartbeat": now}))
        except OSError as err:
            if not self.beat_failed:
                self.beat_failed = True
                return f"{self.path}: heartbeat not written ({err}); another node may take the run over"
        return None

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if _is_mine(read_record(self.path)):
            self.path.unlink(missing_ok=True)
