"""The same command twice, and again right after a stop, answer in one line each: a launch into a run directory that
a live run holds is refused before any rendezvous (whose port the same command shares), one whose holder is still
saving after a stop waits for it and continues, a rendezvous port something else listens on is named; and a lock
file planted in a received run directory holds nothing."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from conftest import REPO
from conftest import training_overrides as overrides

from megapico.checkpoint import run_lock
from megapico.checkpoint.run_lock import LOCK_FILE, RunLock, RunLockedError, record_stop, wait_until_free

RUN = ("runs", "megapico-run")
HOST = socket.gethostname()


def _port(base):
    return str(base + os.getpid() % 1000)


def _live_lock(directory, holder, **fields):
    """A lock of `holder` (a live process on this host), as its launch wrote it."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {"host": HOST, "pid": holder.pid, "since": "2026-12-07T10:00:00", "where": run_lock._where(),
              "process_started": psutil.Process(holder.pid).create_time(), "heartbeat": time.time(), **fields}
    (directory / LOCK_FILE).write_text(json.dumps(record))


@pytest.fixture
def sleeper():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("planted", [
    {"host": "elsewhere", "pid": 4242, "since": "x", "heartbeat": time.time() - 3600, "stale_s": 1e300},
    {"host": "elsewhere", "pid": 4242, "since": "x", "heartbeat": 1e15},
    {"host": "elsewhere", "pid": "4242", "since": "x", "heartbeat": "soon"},
    {"host": "elsewhere\n\x1b[2Jerror: all is well", "pid": 4242, "since": "x", "heartbeat": time.time()},
    ["not", "a", "record"],
    "not json {",
    "x" * 10_000_000,
])
def test_a_planted_lock_holds_nothing(tmp_path, planted):
    """A received run directory's lock file claims nothing megapico does not check itself: a huge stale_s (every
    launch refused forever before), a heartbeat in the future, wrong types (a traceback before), control
    characters for the one-line message, another JSON shape, a 10 MB file: every one is taken over, with a
    warning naming why."""
    path = tmp_path / LOCK_FILE
    path.write_text(planted if isinstance(planted, str) else json.dumps(planted))
    wait_until_free(tmp_path, run_lock.STALE_S, rank=0)  # no live holder: the launch goes on at once
    warning = RunLock(tmp_path).acquire()
    assert warning is not None and "\n" not in warning and "\x1b" not in warning
    old = re.fullmatch(re.escape(f"{path}: taking over from host elsewhere, pid 4242, since x: its heartbeat is ")
                       + r"(\d+) min old", warning)  # planted an hour before collection: at least 60 min when run
    assert (old is not None and int(old[1]) >= 60) or warning == (
        f"{path}: taking over from a lock file: not a lock megapico wrote") or (
        warning.startswith(f"{path}: taking over from host elsewhere, pid 4242, since x: its heartbeat is ")
        and warning.endswith(" min in the future"))
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_live_training_run_refuses_at_once_and_a_saving_one_is_waited_for(tmp_path, sleeper, capsys):
    _live_lock(tmp_path, sleeper)
    started = time.monotonic()
    with pytest.raises(RunLockedError, match=rf"^{tmp_path}: held by a live run \(host {HOST}, pid {sleeper.pid}, "
                                             rf"since 2026-12-07T10:00:00\); stop it first, or choose another "
                                             rf"checkpointing.run_name$"):
        wait_until_free(tmp_path, run_lock.STALE_S, rank=0)
    assert time.monotonic() - started < 1

    _live_lock(tmp_path, sleeper, state="stopping", why="SIGINT received", stopping_since="2026-12-07T11:00:00")
    with pytest.raises(RunLockedError, match=rf"^{tmp_path}: its run \(host {HOST}, pid {sleeper.pid}, since "
                                             rf"2026-12-07T10:00:00\) was stopped \(SIGINT received, at "
                                             rf"2026-12-07T11:00:00\) and is still saving its last step; run the same "
                                             rf"command again once pid {sleeper.pid} has exited \(waited 2 s\)$"):
        wait_until_free(tmp_path, run_lock.STALE_S, rank=0, wait_s=2)
    assert capsys.readouterr().out == (
        f"{tmp_path}: its run (host {HOST}, pid {sleeper.pid}, since 2026-12-07T10:00:00) was stopped (SIGINT "
        f"received, at 2026-12-07T11:00:00) and is saving its last step; waiting for it to exit (at most 2 s)\n")

    def finish_the_save():  # the holder releases its lock, then exits
        time.sleep(1.5)
        (tmp_path / LOCK_FILE).unlink()
        time.sleep(0.5)
        sleeper.kill()

    threading.Thread(target=finish_the_save).start()
    wait_until_free(tmp_path, run_lock.STALE_S, rank=0, wait_s=30)
    assert sleeper.poll() is not None  # returned only once the holder's process (and its port) was gone


def test_a_stop_is_noted_in_the_holders_lock_and_kept_by_its_heartbeat(tmp_path, sleeper):
    lock = RunLock(tmp_path)
    lock.acquire()
    record_stop(tmp_path, "SIGTERM received")
    lock.last_beat = 0.0
    lock.beat()
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["state"] == "stopping" and record["why"] == "SIGTERM received" and record["pid"] == os.getpid()
    _live_lock(tmp_path, sleeper)  # another process's lock: left as it is
    record_stop(tmp_path, "SIGTERM received")
    assert "state" not in json.loads((tmp_path / LOCK_FILE).read_text())


def test_a_taken_rendezvous_port_is_one_line_naming_it(sample_prefix, tmp_path):
    """Another program (another run elsewhere) listens on the rendezvous port: rank 0 cannot host the rendezvous
    there; it says which port and how to choose another, with no traceback (what rank 0 of any launcher sees)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environment = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}
        out = subprocess.run([sys.executable, str(REPO / "pretrain.py"), *overrides(sample_prefix, tmp_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=300, env=environment)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: the rendezvous port 127.0.0.1:{port} is taken (by another run, or another program); pick a free "
        f"one: deepspeed --master_port N, torchrun --master-port N, or MASTER_PORT=N for srun and mpirun")
    assert not tmp_path.joinpath(*RUN).exists()


SLOW_SAVE = textwrap.dedent("""
    # pretrain.py with a save that lasts while ./hold exists (at most 240 s): a stop's save under load
    import runpy, sys, time
    from pathlib import Path
    from megapico.training import trainer
    save, hold = trainer.save_training_checkpoint, Path(__file__).with_name("hold")

    def slow_save(*args, **kwargs):
        deadline = time.monotonic() + 240
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return save(*args, **kwargs)

    trainer.save_training_checkpoint = slow_save
    sys.argv[0] = "pretrain.py"
    runpy.run_path("pretrain.py", run_name="__main__")
""")


class Launch:
    """A launcher command in its own session, its output read as it comes."""

    def __init__(self, command):
        self.process = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text, timeout=300):
        """Until a line holds `text`; the output ending first (every process of the launch gone) fails."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return
            assert self.reader.is_alive() or any(text in line for line in list(self.lines)), self.output()
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} in {timeout} s:\n{self.output()}")

    def last_step(self):
        return max(int(m[1]) for line in list(self.lines) if (m := re.match(r"step (\d+)/", line)))

    def output(self):
        return "".join(self.lines)[-4000:]

    def end(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def test_the_same_deepspeed_command_twice_and_again_right_after_a_stop(sample_prefix, tmp_path):
    """A runs. The same command again (B: same rendezvous port) answers in one line naming A's rank 0, and exits
    non-zero while A trains on untouched. A is stopped (SIGINT to its launcher, which returns at once while the
    ranks save, here held saving until C has spoken): the same command again (C) says A is still saving and waits,
    then resumes the step A saved."""
    hold = tmp_path / "hold"
    hold.touch()
    script = tmp_path / "slow_save_pretrain.py"
    script.write_text(SLOW_SAVE)
    settings = overrides(sample_prefix, tmp_path, **{"training.max_steps": 100000, "training.micro_batch_size": 2})
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", _port(41500),
               str(script), *settings]
    lock = tmp_path.joinpath(*RUN, LOCK_FILE)
    first = Launch(command)
    again = None
    try:
        first.wait_for("step 2/")
        holder = json.loads(lock.read_text())
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        said = second.stdout + second.stderr
        ours = [line for line in said.splitlines() if "megapico-run" in line or line.startswith("error")]
        assert second.returncode != 0 and "Traceback" not in said and "EADDRINUSE" not in said, said[-4000:]
        assert ours == [f"error: {tmp_path.joinpath(*RUN)}: held by a live run (host {HOST}, pid {holder['pid']}, "
                        f"since {holder['since']}); stop it first, or choose another checkpointing.run_name"], ours
        assert first.process.poll() is None and json.loads(lock.read_text())["pid"] == holder["pid"]
        first.wait_for(f"step {first.last_step() + 2}/")  # A trains on

        os.kill(first.process.pid, signal.SIGINT)  # the deepspeed runner: it dies at once, the ranks stop and save
        first.process.wait(timeout=30)
        again = Launch(command)
        again.wait_for("is saving its last step; waiting for it to exit")
        hold.unlink()
        first.wait_for("saved, exiting")
        saved = [m for line in first.lines if (m := re.search(r"step (\d+): .*; checkpoint of step \1 saved, exiting",
                                                              line))]
        assert len(saved) == 1, first.output()
        again.wait_for(f"resumed from {tmp_path.joinpath(*RUN, 'checkpoints', f'step_{saved[0][1]}')}: ")
        again.wait_for(f"step {int(saved[0][1]) + 1}/")
        waiting = [line for line in again.lines if "megapico-run" in line and "waiting" in line]
        assert len(waiting) == 1 and f"pid {holder['pid']}" in waiting[0], waiting  # the why: rank 0's own, or
        # "a stop on another rank" when rank 1 saw the runner gone a step before rank 0 did
        assert "Traceback" not in again.output() and "EADDRINUSE" not in again.output()
    finally:
        hold.unlink(missing_ok=True)
        for launch in (first, again):
            if launch is not None:
                launch.end()
