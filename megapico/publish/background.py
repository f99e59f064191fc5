"""Publishing off the training path: rank 0 starts tools/publish_run.py as a child process after each checkpoint.

checkpoint_saved() and poll() only start or look at a child process (no network, no hashing), so a slow, failing or
hanging Hub never stalls a step; the child's output goes to runs/RUN/publish.log. While a child runs, a new
checkpoint is remembered and one more child starts when it ends (each child sends everything the branch lacks, so
one run covers any number of checkpoints). A child that fails becomes one warning line; the next checkpoint tries
again. close() waits for the children up to a limit and says what is done and what is left.

The token reaches the child only through its environment (HF_TOKEN, or the login file it reads itself): never its
command line, which publish.log records.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from megapico.checkpoint.paths import CheckpointError, open_append
from megapico.config import ConfigError, MegapicoConfig
from megapico.config.load import CHOICES

TOOL = Path(__file__).resolve().parents[2] / "tools" / "publish_run.py"
LOG_FILE = "publish.log"
TRAINING_STATES = CHOICES["checkpointing.hf_checkpoint.training_state"]
BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def run_branch(name: str) -> str:
    """`name` if it can be a run's branch: a run name (letters, digits, '.', '_', '-'), not `main` (the newest
    checkpoint of whichever run updates it: --update-main), nor HEAD, nor a ref git would read another way ('..',
    '.lock', a '/' as in refs/...)."""
    if (not BRANCH.fullmatch(name) or name.lower() in ("main", "head") or ".." in name
            or name.endswith((".", ".lock"))):
        raise ConfigError(f"branch '{name[:80]}': not a run branch (a run publishes on a branch of its own, named "
                          f"with letters, digits, '.', '_' and '-', never main); set checkpointing.run_name or "
                          f"--branch")
    return name


class BackgroundPublisher:
    def __init__(self, run_dir: Path, repo_id: str, branch: str, training_state: str = "last",
                 collection_slug: str = "", retries: int = 5, extra_args: tuple[str, ...] = (), private: bool = True,
                 tokenizer: str = ""):
        self.run_dir = Path(run_dir).absolute()
        self.target = f"{repo_id}@{run_branch(branch)}"
        arguments = [str(self.run_dir), "--repo-id", repo_id, "--branch", branch, "--training-state", training_state]
        if collection_slug:
            arguments += ["--collection-slug", collection_slug]
        if not private:
            arguments += ["--public"]
        if tokenizer:  # the run's own config names it: the child need not take it from a checkpoint's config
            arguments += ["--tokenizer", str(Path(tokenizer).absolute())]
        self.resume_command = f"python tools/publish_run.py {' '.join(arguments)}"
        self.command = [sys.executable, str(TOOL), *arguments, "--retries", str(retries), "--live", *extra_args]
        self.log_path = self.run_dir / LOG_FILE
        self.process: subprocess.Popen | None = None
        self.pending = False
        self.last_exit: int | None = None
        self.warnings: list[str] = []

    @classmethod
    def from_config(cls, config: MegapicoConfig) -> "BackgroundPublisher | None":
        """The publisher checkpointing.save_to_hf asks for (None when it is off; the config's own checks have
        passed); starts nothing. A run name that cannot be a run branch (main) is a ConfigError here, at start-up."""
        checkpointing = config.checkpointing
        if not checkpointing.save_to_hf:
            return None
        hub = checkpointing.hf_checkpoint
        if not TOOL.is_file():
            raise ConfigError(f"{TOOL}: missing; checkpointing.save_to_hf runs it (use a source checkout of megapico)")
        return cls(Path(checkpointing.runs_dir) / checkpointing.run_name, hub.repo_id, checkpointing.run_name,
                   hub.training_state, hub.collection_slug, hub.retries, private=hub.private,
                   tokenizer=config.data.tokenizer)

    def checkpoint_saved(self) -> None:
        """A checkpoint is complete: publish it now, or as soon as the running child ends. Never blocks."""
        self._reap()
        if self.process is None:
            self._start()
        else:
            self.pending = True

    def poll(self) -> list[str]:
        """Cheap (no network): start a remembered publication once the previous one ended; a warning line for each
        child that failed since the last call."""
        self._reap()
        if self.pending and self.process is None:
            self.pending = False
            self._start()
        lines, self.warnings = self.warnings, []
        return lines

    def close(self, timeout_s: float) -> list[str]:
        """Wait up to timeout_s for the running and remembered publications; a child still running then is stopped
        (publishing is idempotent: tools/publish_run.py sends the rest). Lines saying what is done and what is left."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            self._reap()
            if self.process is None and self.pending:
                self.pending = False
                self._start()
            remaining = deadline - time.monotonic()
            if self.process is None or remaining <= 0:
                break
            try:
                self.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                break
        lines, self.warnings = self.warnings, []
        if self.process is not None or self.pending:
            self._stop()
            lines.append(f"publishing to {self.target}: not finished after {timeout_s:g} s "
                         f"(checkpointing.hf_checkpoint.wait_at_end_s), stopped; last logged: '{self._last_line()}' "
                         f"({self.log_path}); `{self.resume_command}` sends what is left")
        elif self.last_exit == 0:
            lines.append(f"publishing to {self.target}: done, every complete checkpoint is on the branch "
                         f"({self.log_path})")
        elif self.last_exit is not None:
            lines.append(f"publishing to {self.target}: the last attempt failed (exit {self.last_exit}); "
                         f"`{self.resume_command}` sends what is left")
        return lines

    def _start(self) -> None:
        try:
            with open_append(self.log_path) as log:
                log.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {' '.join(self.command)}\n")
                log.flush()
                # its own session: a Ctrl-C meant for training does not cut an upload short; close() ends it
                self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True,
                                                env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
        except (OSError, CheckpointError) as err:
            self.warnings.append(f"publishing to {self.target}: could not start tools/publish_run.py ({err}); the "
                                 f"next checkpoint tries again")

    def _reap(self) -> None:
        if self.process is None or (code := self.process.poll()) is None:
            return
        self.process, self.last_exit = None, code
        if code != 0:
            self.warnings.append(f"publishing to {self.target} failed (exit {code}): {self._last_line()}; the next "
                                 f"checkpoint tries again ({self.log_path})")

    def _stop(self) -> None:
        self.pending = False
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def _last_line(self) -> str:
        """The last line of publish.log (read from its end; a link at its name is not followed)."""
        try:
            descriptor = os.open(self.log_path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return "no log"
        with os.fdopen(descriptor, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
            lines = [line for line in log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip() if lines else "nothing logged"
