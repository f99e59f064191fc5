"""Rank 0's one-line log records, eval_results/step_N.json, and wandb (offline files in the run dir by default).

Step losses stay on the device until a log line, an eval or a checkpoint reads them back, all at once.

wandb metric names follow pico-train: train/loss, trainer/learning_rate, eval/<eval name>; the same records go
to runs/{run}/metrics.jsonl (one JSON object per step and per eval; tools/plot_run.py draws them). A run keeps
one wandb run across launches (its id in runs/{run}/wandb_id.txt).

The learning-dynamics analysis (megapico/training/analysis_runner.py) reports a capture's results after training
has moved past its step N: metrics.jsonl gets them as {"step": N, "analysis": NAME, pico-analyze's keys
`<metric>_<split>/<key>`} when they arrive; wandb, whose own step only grows, plots them against `analysis/step`
= N, each capture's results joining the next row logged (one capture per row, as their keys repeat). A resumed run
keeps such records past its start step: the runner never reports a step's written results twice.

wandb never takes training down. Its service process (wandb-core) is started detached, outside the training
process tree (`wandb beta core start`): DeepSpeed's per-node launcher answers Ctrl-C by terminating each rank's
whole process tree, which used to kill the service first and rank 0 with it, in wandb.log, before it could save.
Being detached, it does not end with the run by itself: rank 0 stops the service it started once wandb.finish
returns (at the end, and after a stop's save), and one whose run died unfinished (SIGKILL, a crash) ends after
SERVICE_IDLE_TIMEOUT with no client (wandb's default, 10 minutes, left one behind every run). A service named by
the user's own WANDB_SERVICE is theirs: used, never started or stopped.
Any wandb failure (at start, in a log, at finish) is one warning, and the run goes on without wandb; metrics.jsonl
holds every record regardless.
"""

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from megapico.checkpoint.paths import open_append, write_text
from megapico.config import MegapicoConfig
from megapico.parallel import ParallelState
from megapico.training.metrics import peak_memory_gib, peak_tflops_per_device

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
SERVICE_IDLE_TIMEOUT = "1m"  # Go duration: how long a detached service outlives a run that could not stop it
SERVICE_STOP_S = 30  # the stopped service's grace before SIGKILL; an idle wandb-core exits in about 2 s


def keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the records of steps after `step` (analysis results excepted:
    those steps are analyzed once, and their results are not reported again)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and ((record := json.loads(line))["step"] <= step or "analysis" in record)]
    write_text(path, "".join(line + "\n" for line in lines))


class RunLogger:
    """`start_step`: the step training (re)starts from; records of later steps left by an earlier launch (steps
    that are about to be run again after a fall-back) are dropped from metrics.jsonl, so each step appears once."""

    def __init__(self, config: MegapicoConfig, run_dir: Path, parallel: ParallelState, flops_per_step: float,
                 start_step: int = 0) -> None:
        self.is_writer = dist.get_rank() == 0
        self.config, self.run_dir = config, run_dir
        self.flops_per_step, self.world = flops_per_step, dist.get_world_size()
        self.tokens_per_step = config.training.micro_batch_size * config.training.gradient_accumulation_steps * \
            parallel.dp_size * config.data.seq_len
        self.peak = peak_tflops_per_device()
        self.pending: list[tuple[int, torch.Tensor, float, int]] = []
        self.start_clock()
        self.metrics_path = run_dir / METRICS_FILE
        if self.is_writer:
            keep_records_up_to(self.metrics_path, start_step)
        self.wandb = None
        self.wandb_step = start_step  # the last row logged to wandb
        self.analysis_rows: list[dict[str, float]] = []  # analysis results waiting for a wandb row
        self.analysis_keys: set[str] = set()  # `<metric>_<split>` prefixes plotted against analysis/step
        self.service: psutil.Process | None = None  # the detached wandb-core this run started, stopped by finish()
        if self.is_writer and config.logging.wandb_mode != "disabled":
            self._wandb_call("start", self._start_wandb)

    def _start_wandb(self) -> None:
        import wandb

        if not os.environ.get("WANDB_SERVICE"):
            started = subprocess.run([str(Path(sys.executable).with_name("wandb")), "beta", "core", "start",
                                      "--idle-timeout", SERVICE_IDLE_TIMEOUT], capture_output=True, text=True,
                                     timeout=120)
            if started.returncode == 0 and started.stdout.strip():
                os.environ["WANDB_SERVICE"] = started.stdout.strip().splitlines()[-1]
                self.service = detached_service(os.environ["WANDB_SERVICE"])
            else:  # wandb.init then starts its own service, inside the process tree
                self.warn(f"wandb: could not start a detached service ({started.stderr.strip()[-200:]}); a Ctrl-C "
                          f"may end wandb before the run saves (the run itself is not affected)")
        config = self.config
        id_path = self.run_dir / WANDB_ID_FILE  # one wandb run per training run, resumed by every launch
        if not id_path.is_file():
            write_text(id_path, secrets.token_hex(8))
        self.wandb = wandb.init(project=config.logging.wandb_project, entity=config.logging.wandb_entity or None,
                                name=config.checkpointing.run_name, dir=str(self.run_dir),
                                id=id_path.read_text().strip(), resume="allow", mode=config.logging.wandb_mode,
                                config=dataclasses.asdict(config))

    def _wandb_call(self, what: str, call) -> None:  # noqa: ANN001
        """Run a wandb call; on any failure warn once and go on without wandb."""
        try:
            call()
        except Exception as err:  # wandb's service gone, a network error, a full disk: none may stop training
            self.wandb = None
            reason = str(err).splitlines()[0][:160] if str(err) else ""
            self.warn(f"wandb failed in {what} ({type(err).__name__}: {reason}); continuing without wandb, "
                      f"metrics.jsonl has every record")

    def record_event(self, step: int, event: str, message: str) -> None:
        """A warning the run went on past (a failing Hub), kept in metrics.jsonl beside the numbers."""
        self._append([{"step": step, "event": event, "message": message}])

    def record_launch(self, step: int, resumed: bool, layout: str, global_batch: int) -> None:
        """Mark where each launch starts in metrics.jsonl (tools/plot_run.py draws resumes and layout changes)."""
        self._append([{"step": step, "event": "resume" if resumed else "start", "layout": layout,
                       "global_batch": global_batch}])

    def _append(self, records: list[dict]) -> None:
        if self.is_writer and records:
            with open_append(self.metrics_path) as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)

    def start_clock(self) -> None:
        """Start timing training steps (after set-up, eval or a checkpoint, which tokens/s must not count)."""
        self.clock_start, self.clock_steps = time.perf_counter(), 0

    def record_step(self, step: int, loss: torch.Tensor, lr: float, consumed: int) -> None:
        """Keep the step's loss on the device; nothing is read back until flush()."""
        self.pending.append((step, loss, lr, consumed))
        self.clock_steps += 1

    def flush(self, step: int | None, grad_norm: float | torch.Tensor | None, printing: bool) -> dict[int, float]:
        """Read the pending losses back in one host sync, send them to wandb and, if `printing`, print step's
        log line. Returns {step: loss} of the pending steps."""
        if not self.pending:
            return {}
        losses = torch.stack([loss for _, loss, _, _ in self.pending]).tolist()
        seconds = time.perf_counter() - self.clock_start  # after the sync: the device work is done
        records = [(record_step, value, lr, consumed)
                   for (record_step, _, lr, consumed), value in zip(self.pending, losses, strict=True)]
        self.pending = []
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        step_seconds = seconds / max(1, self.clock_steps)
        rows = []
        for record_step, value, lr, consumed in records:
            metrics = {"train/loss": value, "trainer/learning_rate": lr, "trainer/consumed_samples": consumed}
            if record_step == step and printing:
                metrics.update({"trainer/grad_norm": norm, "trainer/tokens_per_second": self.tokens_per_step /
                                step_seconds})
            rows.append({"step": record_step, **metrics})
            self._wandb_log(metrics, record_step)
        self._append(rows)
        if printing and self.is_writer and self.clock_steps:
            _, loss, lr, _ = records[-1]
            tflops = self.flops_per_step / step_seconds / self.world / 1e12
            mfu = f"{100 * tflops / self.peak:.1f}%" if self.peak else "n/a"
            print(f"step {step}/{self.config.training.max_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm "
                  f"{norm:.3f} | {self.tokens_per_step / step_seconds:,.0f} tok/s | {tflops:.2f} TFLOP/s/device | "
                  f"MFU {mfu} | peak mem {peak_memory_gib():.2f} GiB", flush=True)
            self.start_clock()
        return {record_step: value for record_step, value, _, _ in records}

    def log_eval(self, step: int, perplexity: float) -> None:
        if not self.is_writer:
            return
        name = self.config.evaluation.name
        print(f"step {step} | eval {name} perplexity {perplexity:.3f}", flush=True)
        results = self.run_dir / "eval_results"
        results.mkdir(parents=True, exist_ok=True)
        write_text(results / f"step_{step}.json", json.dumps({name: perplexity}))
        self._append([{"step": step, f"eval/{name}": perplexity}])
        self._wandb_log({f"eval/{name}": perplexity}, step)

    def log_analysis(self, step: int, analysis_name: str, scalars: dict[str, float]) -> None:
        """One capture's analysis results (pico-analyze's `<metric>_<split>/<key>`) at their step."""
        if not self.is_writer or not scalars:
            return
        self._append([{"step": step, "analysis": analysis_name, **scalars}])
        if self.wandb is None:
            return
        for prefix in sorted({key.split("/")[0] for key in scalars} - self.analysis_keys):
            if not self.analysis_keys:
                self._wandb_call("define_metric", lambda: self.wandb.define_metric("analysis/step"))
            self.analysis_keys.add(prefix)
            self._wandb_call("define_metric", lambda prefix=prefix: self.wandb.define_metric(
                f"{prefix}/*", step_metric="analysis/step"))
        self.analysis_rows.append({"analysis/step": step, **scalars})

    def _wandb_log(self, metrics: dict, step: int) -> None:
        """Log a wandb row at `step`, joined by the oldest analysis results still waiting for one."""
        if self.wandb is None:
            return
        if self.analysis_rows:
            metrics = {**metrics, **self.analysis_rows.pop(0)}
        self.wandb_step = max(self.wandb_step, step)
        self._wandb_call("log", lambda: self.wandb.log(metrics, step=step))

    def warn(self, message: str) -> None:
        if self.is_writer:
            print(f"warning: {message}", flush=True)

    def finish(self) -> None:
        """Log the analysis results still waiting for a row (each on a row of its own past the last), finish the
        wandb run, then stop the service this run started (the run's files are complete by then)."""
        while self.wandb is not None and self.analysis_rows:
            self._wandb_log({}, self.wandb_step + 1)
        if self.wandb is not None:
            self._wandb_call("finish", self.wandb.finish)
        if self.service is not None:
            self._stop_service()

    def _stop_service(self) -> None:
        """SIGTERM the detached wandb-core this run started, which it answers by shutting down, and wait for it."""
        import wandb

        service, self.service = self.service, None
        self._wandb_call("teardown", wandb.teardown)  # this process's side of its connection
        os.environ.pop("WANDB_SERVICE", None)
        try:
            service.terminate()
            deadline = time.monotonic() + SERVICE_STOP_S
            while service.is_running() and service.status() != psutil.STATUS_ZOMBIE:  # exited, left to its reaper
                if time.monotonic() > deadline:
                    service.kill()
                    break
                time.sleep(0.05)
        except psutil.NoSuchProcess:  # gone
            pass
        except psutil.Error as err:
            self.warn(f"wandb: could not stop its service (pid {service.pid}: {type(err).__name__}); it exits "
                      f"{SERVICE_IDLE_TIMEOUT} after its last client")


def detached_service(token: str) -> psutil.Process | None:
    """The wandb-core process `wandb beta core start` left running, found by its token (`3-PID-unix-PATH` or
    `3-PID-tcp-localhost-PORT`): PID is the starting command's, which the service's command line carries
    (`--pid PID --detached`). None if it cannot be found; it then ends SERVICE_IDLE_TIMEOUT after the run."""
    parts = token.split("-")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if "--detached" in command and any(flag == "--pid" and value == parts[1]
                                           for flag, value in zip(command, command[1:], strict=False)):
            return process
    return None
