"""Graceful stop wherever the signal lands: SIGTERM on some ranks, to the whole job, or to one launcher's pid; a
launcher SIGKILLed (the deepspeed runner, torchrun's agent, Open MPI's mpirun, SLURM's srun); a console that goes
with its launcher. Open MPI and SLURM tests run where `mpirun` / a SLURM cluster exist (scripts/ci_launchers.sh
installs both on a Debian machine; the signal table of docs/preemption.md was measured with them)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from conftest import REPO, slurm_cluster_up
from conftest import training_overrides as overrides
from distributed import train

from megapico.checkpoint.manifest import read_manifest
from megapico.training.preemption import reader_is_gone

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="no Open MPI mpirun on this machine")
needs_slurm = pytest.mark.skipif(not slurm_cluster_up("srun"), reason="no idle SLURM cluster reachable from here")
RUN = ("runs", "megapico-run")


def _port(base):
    return str(base + os.getpid() % 1000)


def _deepspeed_runner(port_base):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", _port(port_base)]


def _mpirun(port_base):
    """mpirun on this node; the rendezvous address comes from the environment (launcher_environment)."""
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "MASTER_ADDR=127.0.0.1", "-x",
            f"MASTER_PORT={_port(port_base)}", "-x", "PYTHONUNBUFFERED", sys.executable]


def _srun(tmp_path):
    return ["srun", "--nodes=1", "--ntasks=2", f"--job-name=megapico-{tmp_path.name}", sys.executable]


def _cmdline(process):
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _run_and_stop(command, settings, tmp_path, stop, at_step=5):
    """Start pretrain.py under a launcher, call stop(launcher process) once step `at_step` is logged and wait until
    every process of the run has exited (the ranks of an srun step are not srun's children: found by their command
    line). Returns (what the launcher printed and every console_rank*.log of the run, the launcher's exit code)."""
    process = subprocess.Popen([*command, str(REPO / "pretrain.py"), *settings], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": _port(38500)})
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(f"step {at_step}/"):
            break
    started = psutil.Process(process.pid).children(recursive=True)
    started += [p for p in psutil.process_iter() if p not in started and str(tmp_path) in _cmdline(p)
                and p.pid != process.pid]
    stop(process)
    lines += process.stdout.readlines()  # EOF once every process holding the pipe has exited
    code = process.wait(timeout=60)
    _, alive = psutil.wait_procs(started, timeout=60)
    for leftover in alive:
        leftover.send_signal(signal.SIGKILL)
    consoles = sorted(tmp_path.joinpath(*RUN).glob("console_rank*.log"))
    output = "".join(lines) + "".join(path.read_text() for path in consoles)
    assert not alive, f"processes outlived their launcher: {alive}\n{output[-3000:]}"
    return output, code


def _saved_step(output, tmp_path):
    """(step, why) of the stop's line, checked against `latest`."""
    match = re.search(r"step (\d+): (.+?); checkpoint of step \1 saved, exiting", output)
    assert match, output[-3000:]
    checkpoints = tmp_path.joinpath(*RUN, "checkpoints")
    assert (checkpoints / "latest").read_text() == f"step_{match[1]}"
    assert read_manifest(checkpoints / f"step_{match[1]}")["kind"] == "full"
    return int(match[1]), match[2]


def _losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _long_run(sample_prefix, tmp_path):
    return overrides(sample_prefix, tmp_path, **{"training.max_steps": 100000, "training.lr_warmup_steps": 2,
                                                 "training.micro_batch_size": 2})


def test_sigterm_saves_the_step_exits_cleanly_and_resumes_exactly(sample_prefix, tmp_path, capfd):
    """SIGTERM reaches rank 1 only, during step 3: both ranks stop after step 3, save it, and return normally."""
    settings = overrides(sample_prefix, tmp_path, **{"training.micro_batch_size": 2})
    first = train(2, settings, tmp_path, fault="sigterm_on_rank_1_at_step_3")
    assert sorted(first["losses"]) == [1, 2, 3]
    assert "step 3: a stop on another rank; checkpoint of step 3 saved" in capfd.readouterr().out
    checkpoints = tmp_path / "runs" / "megapico-run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_3"
    resumed = train(2, settings, tmp_path)
    uninterrupted = train(2, overrides(sample_prefix, tmp_path / "whole", **{"training.micro_batch_size": 2}),
                          tmp_path)
    assert resumed["resumed_from"] == 3
    assert {**first["losses"], **resumed["losses"]} == uninterrupted["losses"]


def test_sigterm_to_the_deepspeed_job_saves_and_exits_within_its_grace(sample_prefix, tmp_path):
    """What a cluster does on preemption: SIGTERM to the job's processes (`deepspeed`, its launch.py, which passes
    it on and kills 30 s later, and the ranks). Both ranks finish their step, save it and exit well inside the
    grace; no FutureWarning on the way."""
    settings = overrides(sample_prefix, tmp_path, **{"parallel.tensor_parallel_size": 2, "training.max_steps": 100000,
                                                     "training.lr_warmup_steps": 2})
    signalled = []

    def sigterm_to_the_job(launcher):
        signalled.append(time.monotonic())
        os.killpg(launcher.pid, signal.SIGTERM)

    output, code = _run_and_stop(_deepspeed_runner(32500), settings, tmp_path, sigterm_to_the_job, at_step=3)
    step, why = _saved_step(output, tmp_path)
    assert why == "SIGTERM received" and time.monotonic() - signalled[0] < 30 and "FutureWarning" not in output


def test_sigterm_to_the_deepspeed_runner_alone_saves_the_step_and_resumes_exactly(sample_prefix, tmp_path):
    """DeepSpeed's runner forwards no SIGTERM on one node and dies of it: the ranks see it gone at the end of the
    step, save that step (none was due) and exit; the same command resumes it, equal to an uninterrupted run."""
    settings = overrides(sample_prefix, tmp_path, **{"training.max_steps": 12, "training.micro_batch_size": 2})
    output, _ = _run_and_stop(_deepspeed_runner(33500), settings, tmp_path,
                              lambda launcher: os.kill(launcher.pid, signal.SIGTERM), at_step=3)
    step, why = _saved_step(output, tmp_path)
    assert why.startswith("the deepspeed runner (pid") and why.endswith("is gone") and 3 <= step < 12
    out = subprocess.run([*_deepspeed_runner(34500), str(REPO / "pretrain.py"), *settings], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    whole = overrides(sample_prefix, tmp_path / "whole", **{"training.max_steps": 12, "training.micro_batch_size": 2})
    assert subprocess.run([*_deepspeed_runner(35500), str(REPO / "pretrain.py"), *whole], cwd=REPO,
                          capture_output=True, timeout=600).returncode == 0
    resumed, uninterrupted = _losses(tmp_path.joinpath(*RUN)), _losses((tmp_path / "whole").joinpath(*RUN))
    assert sorted(resumed) == list(range(1, 13)) and resumed == uninterrupted


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", pytest.param("mpirun", marks=needs_mpirun)])
def test_a_sigkilled_launcher_leaves_no_rank_running(sample_prefix, tmp_path, launcher):
    """SIGKILL forwards nothing: the ranks notice their launcher (the deepspeed runner; torchrun's agent or mpirun,
    their parent) is gone, save the step in progress and exit within one step. mpirun took the ranks' console
    with it (it forwards their output through pipes it reads): their output continues in console_rank{R}.log."""
    command = {"deepspeed": lambda: _deepspeed_runner(36500), "mpirun": lambda: _mpirun(39500),
               "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", _port(37500)]}[launcher]()
    output, _ = _run_and_stop(command, _long_run(sample_prefix, tmp_path), tmp_path,
                              lambda process: os.kill(process.pid, signal.SIGKILL))
    step, why = _saved_step(output, tmp_path)
    assert why.startswith({"deepspeed": "the deepspeed runner", "torchrun": "torchrun's agent",
                           "mpirun": "Open MPI's mpirun"}[launcher])
    assert step in (6, 7)  # killed during step 6: seen at its end (or, at worst, the next one)
    if launcher == "mpirun":
        console = tmp_path.joinpath(*RUN, "console_rank0.log").read_text()
        assert console.startswith("stdout and stderr lost their reader") and f"checkpoint of step {step}" in console


@pytest.mark.parametrize("launcher", [pytest.param("mpirun", marks=needs_mpirun),
                                      pytest.param("srun", marks=needs_slurm)])
def test_sigusr1_to_the_launcher_reaches_the_ranks_which_save_and_exit_0(sample_prefix, tmp_path, launcher):
    """mpirun and srun forward SIGUSR1 to their ranks and wait for them: the way to preempt either by its pid
    (their SIGTERM kills the ranks within 1-2 s or at once; docs/preemption.md)."""
    command = _mpirun(40500) if launcher == "mpirun" else _srun(tmp_path)
    output, code = _run_and_stop(command, _long_run(sample_prefix, tmp_path), tmp_path,
                                 lambda process: os.kill(process.pid, signal.SIGUSR1))
    step, why = _saved_step(output, tmp_path)
    assert why == "SIGUSR1 received" and code == 0 and step >= 5


@needs_slurm
def test_scancel_reaches_the_ranks_which_save_and_exit_0(sample_prefix, tmp_path):
    """scancel (and SLURM's own time limit and preemption): SIGTERM to every task, SIGKILL KillWait (30 s) later."""

    def cancel(process):
        jobs = subprocess.run(["squeue", "-h", "-o", "%i", "-n", f"megapico-{tmp_path.name}"], capture_output=True,
                              text=True, timeout=30).stdout.split()
        subprocess.run(["scancel", jobs[0]], check=True, timeout=30)

    output, code = _run_and_stop(_srun(tmp_path), _long_run(sample_prefix, tmp_path), tmp_path, cancel)
    assert _saved_step(output, tmp_path)[1] == "SIGTERM received" and code == 0


@needs_slurm
def test_a_sigkilled_srun_takes_its_ranks_with_it(sample_prefix, tmp_path):
    """SLURM's slurmstepd kills the step's tasks at once when srun is gone: no rank outlives it (and none can
    save; docs/preemption.md)."""
    output, code = _run_and_stop(_srun(tmp_path), _long_run(sample_prefix, tmp_path), tmp_path,
                                 lambda process: os.kill(process.pid, signal.SIGKILL))
    assert code == -signal.SIGKILL and "checkpoint of step" not in output


CONSOLE_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from megapico.training.preemption import keep_the_console, reader_is_gone
    print("before", flush=True)
    sys.stdin.readline()  # the parent has closed the reading end of our stdout by now
    gone = reader_is_gone(1)
    moved = keep_the_console(Path(sys.argv[1]))
    print("after", gone, moved, flush=True)
    print("to stderr", file=sys.stderr, flush=True)
""")


def test_a_lost_console_is_moved_to_the_run_directory(tmp_path):
    """A rank whose stdout reader has gone (a launcher that forwarded it, killed) keeps running and printing: the
    descriptor now points at the log; a live stderr is left where it is."""
    log = tmp_path / "console_rank0.log"
    child = subprocess.Popen([sys.executable, "-c", CONSOLE_CHILD, str(log)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "before\n"
    child.stdout.close()
    _, stderr = child.communicate("go\n", timeout=60)
    assert child.returncode == 0, stderr
    assert log.read_text() == "after True ['stdout']\n" and stderr == "to stderr\n"


def test_reader_is_gone_only_for_a_closed_pipe(tmp_path):
    read_end, write_end = os.pipe()
    with open(tmp_path / "file", "w") as regular:
        assert not reader_is_gone(write_end) and not reader_is_gone(regular.fileno())
        os.close(read_end)
        assert reader_is_gone(write_end) and not reader_is_gone(regular.fileno())
    os.close(write_end)


def test_ctrl_c_with_the_shipped_defaults_keeps_the_step_and_resumes_exactly(sample_prefix, tmp_path):
    """Ctrl-C (SIGINT to the launcher's whole process group) under the deepspeed launcher with what the demo ships:
    wandb offline and learning dynamics on. DeepSpeed's per-node launcher terminates each rank's process tree;
    wandb's service lives outside it, so rank 0 is not taken down in wandb.log. The step is saved (training state
    first, no capture in the way), the same command resumes, captures the learning dynamics the stop left out, and
    trains the same losses as an uninterrupted run."""
    shipped = {"training.max_steps": 8, "training.micro_batch_size": 2, "logging.wandb_mode": "offline",
               "checkpointing.learning_dynamics.enabled": True, "checkpointing.learning_dynamics.batch_size": 4}
    settings = overrides(sample_prefix, tmp_path, **shipped)
    output, _ = _run_and_stop(_deepspeed_runner(36500), settings, tmp_path,
                              lambda launcher: os.killpg(launcher.pid, signal.SIGINT), at_step=3)
    step, why = _saved_step(output, tmp_path)
    assert why in ("SIGINT received", "SIGTERM received") and 3 <= step < 8, output[-3000:]
    # (the deepspeed runner itself prints a KeyboardInterrupt traceback: that is the launcher, not a rank)
    assert "ConnectionResetError" not in output and "Connection closed by peer" not in output, output[-3000:]
    checkpoints = tmp_path.joinpath(*RUN, "checkpoints")
    assert not any(name.startswith("learning_dynamics/") for name in read_manifest(checkpoints / f"step_{step}")[
        "files"])
    again = subprocess.run([*_deepspeed_runner(37500), str(REPO / "pretrain.py"), *settings], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"step {step}: capturing the learning dynamics the stop left out" in again.stdout
    assert (checkpoints / f"step_{step}" / "learning_dynamics" / "train_activations.pt").is_file()
    assert any(name.startswith("learning_dynamics/") for name in read_manifest(checkpoints / f"step_{step}")["files"])
    whole = overrides(sample_prefix, tmp_path / "whole", **{**shipped, "logging.wandb_mode": "disabled"})
    train(2, whole, tmp_path)
    assert _losses(tmp_path.joinpath(*RUN)) == _losses((tmp_path / "whole").joinpath(*RUN))
