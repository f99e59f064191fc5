"""A new user's first hour: a resume is the same run at any layout, one run per run directory, and each mistake is
one line before any work (another model, another schedule, a failed start, no config, a bare path for a list)."""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
import types

import pytest
from conftest import REPO
from conftest import training_overrides as overrides
from distributed import train

from megapico.checkpoint import run_lock
from megapico.checkpoint.run_lock import LOCK_FILE
from megapico.config import load_config

RUN = ("runs", "megapico-run")


def consumed_at(tmp_path, step):
    state = tmp_path.joinpath(*RUN, "checkpoints", f"step_{step}", "megapico_state.json")
    return json.loads(state.read_text())["consumed_samples"]


def test_a_resume_at_another_layout_keeps_the_global_batch_and_is_the_same_run(sample_prefix, tmp_path, capfd):
    """DP=2 x micro 2 x accumulation 2 (global 8) stopped at step 2, resumed at DP=1 with the same YAML values
    (training.global_batch_size stated, as in the recipes): accumulation becomes 4, and the losses are an
    uninterrupted DP=2 run's."""
    settings = {"training.micro_batch_size": 2, "training.gradient_accumulation_steps": 2, "training.max_steps": 4,
                "training.global_batch_size": 8}  # stated, as the 16-GPU recipes do
    first = train(2, overrides(sample_prefix, tmp_path, **settings, **{"training.exit_interval": 2}), tmp_path)
    resumed = train(1, overrides(sample_prefix, tmp_path, **settings), tmp_path)
    out = capfd.readouterr().out
    assert ("resume: keeping the run's global batch of 8: training.gradient_accumulation_steps 2 -> 4 (micro batch "
            "2 x DP 1)") in out
    assert consumed_at(tmp_path, 2) == 16 and consumed_at(tmp_path, 4) == 32
    whole = train(2, overrides(sample_prefix, tmp_path / "whole", **settings), tmp_path)
    both = {**first["losses"], **resumed["losses"]}
    assert both.keys() == whole["losses"].keys() and all(abs(both[s] - whole["losses"][s]) < 1e-5 for s in both)

    # a micro batch that cannot make the run's global batch: one line saying how; training.global_batch_size
    # changes it on purpose
    with pytest.raises(Exception, match=r"cannot keep the run's global batch of 8 at DP=1 with "
                                        r"training.micro_batch_size=3 \(8 is not a multiple of 3\); set "
                                        r"training.micro_batch_size to a divisor of 8"):
        train(1, overrides(sample_prefix, tmp_path, **{**settings, "training.micro_batch_size": 3,
                                                       "training.global_batch_size": 0}), tmp_path)


@pytest.fixture(scope="module")
def saved_run(sample_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saved")
    train(1, overrides(sample_prefix, tmp, **{"training.max_steps": 2}), tmp)
    return tmp


@pytest.mark.parametrize("change, message", [
    ({"model.n_layers": 3}, r"model.n_layers=3 but .*step_2 was trained with 2; resume with the checkpoint's model"),
    ({"training.max_steps": 4}, r"training.max_steps 2 -> 4 on resume would re-stretch the LR schedule from step 2 "
                                r"on; set training.change_schedule_on_resume=true"),
    ({"training.lr": 1e-3}, r"training.lr 0.003 -> 0.001 on resume"),
])
def test_resuming_another_model_or_schedule_is_one_line(sample_prefix, saved_run, change, message):
    with pytest.raises(Exception, match=message):
        train(1, overrides(sample_prefix, saved_run, **{"training.max_steps": 2, **change}), saved_run)


def run_pretrain(*arguments, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "pretrain.py"), *arguments], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_a_live_run_holds_its_directory_and_a_gone_one_is_taken_over(sample_prefix, saved_run, tmp_path):
    run_dir = saved_run.joinpath(*RUN)
    lock = run_dir / LOCK_FILE
    settings = overrides(sample_prefix, saved_run, **{"training.max_steps": 2})
    before = sorted(str(p) for p in run_dir.rglob("*"))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        import psutil

        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": "2026-12-05T00:00:00",
                                    "where": run_lock._where(),
                                    "process_started": psutil.Process(holder.pid).create_time(),
                                    "heartbeat": time.time()}))
        before = sorted(str(p) for p in run_dir.rglob("*"))
        out = run_pretrain(*settings)
        assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
            f"error: {run_dir}: held by a live run (host {socket.gethostname()}, pid {holder.pid}, since "
            f"2026-12-05T00:00:00); stop it first, or choose another checkpointing.run_name")
        assert sorted(str(p) for p in run_dir.rglob("*")) == before  # nothing changed
    finally:
        holder.kill()
        holder.wait()
    out = run_pretrain(*settings)  # its process is gone: taken over
    assert out.returncode == 0 and f"warning: {lock}: taking over from host {socket.gethostname()}, pid " \
                                   f"{holder.pid}" in out.stdout and f"its process {holder.pid} is gone" in out.stdout
    assert not lock.exists()  # released at the end
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "since": "x", "heartbeat": time.time() - 3600}))
    out = run_pretrain(*settings)  # another host's run whose heartbeat stopped an hour ago
    assert out.returncode == 0 and "its heartbeat is 60 min old" in out.stdout


def test_start_mistakes_are_one_line_and_leave_nothing(sample_prefix, saved_run, tmp_path):
    out = run_pretrain()
    assert out.returncode == 1 and out.stderr.strip() == (
        "error: no config given; pass --config FILE.yaml (e.g. examples/cpu_demo.yaml) and/or section.key=value "
        "overrides")
    out = run_pretrain(*overrides(str(tmp_path / "missing"), tmp_path))
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not tmp_path.joinpath(*RUN).exists()  # the failed start left no run directory

    checkpoints = saved_run.joinpath(*RUN, "checkpoints")
    (checkpoints / "step_9").mkdir()
    (checkpoints / "step_9" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    out = run_pretrain(*overrides(sample_prefix, saved_run, **{"training.max_steps": 2}))
    assert out.returncode == 0 and (f"warning: {checkpoints / 'step_9'}: a half-written checkpoint (no "
                                    f"manifest.json: its save did not finish)") in out.stdout


def test_a_bare_path_is_a_one_element_list():
    config = load_config(None, ["data.train_data_path=../x", "data.eval_data_path=[a,b]"])
    assert config.data.train_data_path == ["../x"] and config.data.eval_data_path == ["a", "b"]


def test_a_failing_wandb_is_one_warning_and_training_goes_on(capsys):
    """wandb's service gone (what DeepSpeed's launcher did to it on Ctrl-C): the next log call warns once and the
    logger carries on without wandb."""
    from megapico.training.logger import RunLogger

    logger = RunLogger.__new__(RunLogger)
    logger.is_writer = True

    def lost(*_args, **_kwargs):
        raise ConnectionResetError("Connection lost")

    logger.wandb = types.SimpleNamespace(log=lost, finish=lost)
    logger._wandb_call("log", lambda: logger.wandb.log({"train/loss": 1.0}, step=1))
    assert logger.wandb is None
    assert capsys.readouterr().out == ("warning: wandb failed in log (ConnectionResetError: Connection lost); "
                                       "continuing without wandb, metrics.jsonl has every record\n")


def test_a_schedule_changed_on_purpose_is_the_new_schedule_at_the_same_layout(sample_prefix, saved_run, tmp_path):
    """change_schedule_on_resume with a new lr: the loaded scheduler's old lr gives way to the new one, as in a
    fresh run of the new schedule (the same layout loads DeepSpeed's scheduler state, which holds the old one)."""
    shutil.copytree(saved_run / "runs", tmp_path / "runs")
    changed = {"training.max_steps": 4, "training.lr": 1e-3, "training.change_schedule_on_resume": True}
    train(1, overrides(sample_prefix, tmp_path, **changed), tmp_path)
    train(1, overrides(sample_prefix, tmp_path / "fresh", **changed), tmp_path)

    def lrs(root):
        records = [json.loads(line) for line in root.joinpath(*RUN, "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["trainer/learning_rate"] for r in records if "trainer/learning_rate" in r}

    resumed, fresh = lrs(tmp_path), lrs(tmp_path / "fresh")
    assert [resumed[s] for s in (3, 4)] == pytest.approx([fresh[s] for s in (3, 4)], rel=1e-6)


def test_resume_false_among_an_earlier_runs_checkpoints_is_refused(sample_prefix, saved_run):
    with pytest.raises(Exception, match=r"holds checkpoints of an earlier run \(newest step_\d+\); "
                                        r"checkpointing.resume=false starts a new run"):
        train(1, overrides(sample_prefix, saved_run, **{"training.max_steps": 2, "checkpointing.resume": "false"}),
              saved_run)


def _contend(directory, barrier, results):
    from megapico.checkpoint.run_lock import RunLock, RunLockedError

    barrier.wait()
    try:
        RunLock(directory).acquire()
        results.put("won")
    except RunLockedError:
        results.put("refused")


def test_two_launches_at_once_never_both_hold_the_run(tmp_path):
    context = multiprocessing.get_context("fork")
    for trial in range(10):
        directory = tmp_path / f"run{trial}"
        if trial % 2:  # the second half: both find a dead holder's lock and race to take it over
            directory.mkdir()
            (directory / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7,
                                                           "where": run_lock._where(), "heartbeat": time.time()}))
        barrier, results = context.Barrier(2), context.Queue()
        contenders = [context.Process(target=_contend, args=(directory, barrier, results)) for _ in range(2)]
        for process in contenders:
            process.start()
        for process in contenders:
            process.join(30)
        assert sorted(results.get(timeout=5) for _ in contenders) == ["refused", "won"], trial


def test_a_run_that_has_trained_nothing_takes_the_launchs_batch(sample_prefix, tmp_path, capfd):
    """Step 0 alone (learning dynamics saved it; tools/convert_from_hf.py writes one at DP=1) holds no global batch
    to keep: the first training launch at DP=2 trains micro 2 x accumulation 2 x DP 2 = 8, as configured."""
    settings = {"training.micro_batch_size": 2, "training.gradient_accumulation_steps": 2,
                "checkpointing.learning_dynamics.enabled": True, "checkpointing.learning_dynamics.batch_size": 4}
    train(1, overrides(sample_prefix, tmp_path, **settings, **{"training.max_steps": 0,
                                                                "training.lr_warmup_steps": 0}), tmp_path)
    assert (tmp_path.joinpath(*RUN, "checkpoints", "latest")).read_text() == "step_0"
    capfd.readouterr()
    train(2, overrides(sample_prefix, tmp_path, **settings), tmp_path)
    assert "keeping the run's global batch" not in capfd.readouterr().out
    assert consumed_at(tmp_path, 5) == 5 * 8


def test_resuming_a_finished_run_or_an_earlier_step_says_so(sample_prefix, saved_run, tmp_path):
    """A finished run launched again says in one line that nothing was left to train (exit 0), and a resume from
    an earlier step names the later checkpoints it will replace."""
    shutil.copytree(saved_run / "runs", tmp_path / "runs")
    checkpoints = tmp_path.joinpath(*RUN, "checkpoints")
    shutil.copytree(checkpoints / "step_2", checkpoints / "step_4")  # a later one, kept from an abandoned attempt
    out = run_pretrain(*overrides(sample_prefix, tmp_path, **{"training.max_steps": 2,
                                                              "checkpointing.resume": "step_2"}))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (f"warning: checkpointing.resume=step_2, and {checkpoints} holds later checkpoints (step_4): this run "
            f"replaces each of them when it saves that step again (move them away to keep them)") in out.stdout
    assert out.stdout.strip().splitlines()[-1] == (
        f"{tmp_path.joinpath(*RUN)}: step 2 of training.max_steps=2 was trained already; nothing left to train (to "
        f"train on, raise training.max_steps with training.change_schedule_on_resume=true)")
