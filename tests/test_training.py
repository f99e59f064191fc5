"""pretrain.py's loop on the real DeepSpeed engine (ZeRO-2, gloo, CPU, fp32): DP, TP, AC, resume, faults."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from conftest import training_overrides as overrides
from distributed import train

STEPS = 5  # training_overrides' max_steps


def assert_losses_close(a, b, tolerance):
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= tolerance, (step, a[step], b[step])


@pytest.fixture(scope="module")
def reference(sample_prefix, tmp_path_factory):
    """DP=1, TP=1, global batch 4: the run every layout must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    return train(1, overrides(sample_prefix, tmp), tmp)


def test_reference_run_learns(reference):
    losses = reference["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    assert math.isfinite(reference["perplexities"][STEPS])


def test_dp2_zero2_matches_dp1_and_halves_the_optimizer_state(sample_prefix, tmp_path, reference):
    result = train(2, overrides(sample_prefix, tmp_path, **{"training.micro_batch_size": 2}), tmp_path,
                   capture="zero_partition")
    assert_losses_close(result["losses"], reference["losses"], 1e-5)
    facts = result["facts"]
    assert facts["optimizer"] == "DeepSpeedZeroOptimizer"
    assert facts["local"] == facts["adam"] == math.ceil(facts["model"] / 2)  # fp32 master + Adam: half each


def test_fused_head_under_zero2_dp2_ga2_equals_the_unfused_head(sample_prefix, tmp_path):
    """DP=2 x gradient accumulation 2: the head weight's gradient reaches DeepSpeed once per micro-step, scaled by
    1/GA in backward, and the losses equal pico's unfused head in the same layout."""
    settings = overrides(sample_prefix, tmp_path, **{"training.micro_batch_size": 1,
                                                     "training.gradient_accumulation_steps": 2})
    fused = train(2, settings, tmp_path)
    unfused = train(2, overrides(sample_prefix, tmp_path / "unfused", **{
        "training.micro_batch_size": 1, "training.gradient_accumulation_steps": 2}), tmp_path, fault="unfused_head")
    assert_losses_close(fused["losses"], unfused["losses"], 1e-5)


def test_compiled_blocks_match_eager_and_resume(sample_prefix, tmp_path, reference):
    settings = overrides(sample_prefix, tmp_path, **{"training.compile": True, "training.exit_interval": 3})
    first = train(1, settings, tmp_path)
    resumed = train(1, settings, tmp_path)  # compiled blocks keep pico's state-dict keys: the checkpoint loads
    assert resumed["resumed_from"] == 3
    assert_losses_close({**first["losses"], **resumed["losses"]}, reference["losses"], 1e-5)


def test_compiled_blocks_with_sequence_parallelism_match_tp1(sample_prefix, tmp_path, reference):
    """Compiled blocks around the SP all-gathers and reduce-scatters (gloo) train and evaluate (no_grad, compiled
    again) as TP=1 eager does."""
    result = train(2, overrides(sample_prefix, tmp_path, **{"parallel.tensor_parallel_size": 2,
                                                            "parallel.sequence_parallel": True,
                                                            "training.compile": True}), tmp_path)
    assert_losses_close(result["losses"], reference["losses"], 1e-4)
    assert result["perplexities"][STEPS] == pytest.approx(reference["perplexities"][STEPS], rel=1e-5)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tp2_matches_tp1(sample_prefix, tmp_path, reference, world_size):
    dp = world_size // 2
    result = train(world_size, overrides(sample_prefix, tmp_path, **{"parallel.tensor_parallel_size": 2,
                                                                      "parallel.sequence_parallel": world_size == 4,
                                                                      "training.micro_batch_size": 4 // dp}), tmp_path)
    assert_losses_close(result["losses"], reference["losses"], 1e-4)
    assert result["perplexities"][STEPS] == pytest.approx(reference["perplexities"][STEPS], rel=1e-5)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_nothing(sample_prefix, tmp_path, reference, mode):
    result = train(1, overrides(sample_prefix, tmp_path, **{"training.activation_checkpointing.mode": mode}),
                   tmp_path)
    assert result["losses"] == reference["losses"]  # bit for bit: recomputation repeats the same math


def test_exact_resume_after_exit(sample_prefix, tmp_path, reference):
    first = train(1, overrides(sample_prefix, tmp_path, **{"training.exit_interval": 3}), tmp_path)
    assert sorted(first["losses"]) == [1, 2, 3]
    resumed = train(1, overrides(sample_prefix, tmp_path, **{"training.exit_interval": 3}), tmp_path)
    assert resumed["resumed_from"] == 3
    assert {**first["losses"], **resumed["losses"]} == reference["losses"]  # bit for bit on CPU fp32


def test_resume_at_another_dp_and_tp_size(sample_prefix, tmp_path, reference):
    saved = train(2, overrides(sample_prefix, tmp_path, **{"training.micro_batch_size": 2,
                                                            "training.exit_interval": 3}), tmp_path)
    assert_losses_close(saved["losses"], {s: reference["losses"][s] for s in (1, 2, 3)}, 1e-5)
    # DP=2 checkpoint -> DP=1 (ZeRO partitions merged and re-split by megapico's reshard)
    dp1 = train(1, overrides(sample_prefix, tmp_path, **{"training.exit_interval": 4}), tmp_path)
    assert dp1["resumed_from"] == 3
    assert_losses_close(dp1["losses"], {4: reference["losses"][4]}, 1e-5)
    # DP=1 step-4 checkpoint -> TP=2 (weights and Adam moments split by the TP plan)
    tp2 = train(2, overrides(sample_prefix, tmp_path, **{"parallel.tensor_parallel_size": 2}), tmp_path)
    assert tp2["resumed_from"] == 4
    assert_losses_close(tp2["losses"], {5: reference["losses"][5]}, 1e-4)


def test_resume_from_tp2_to_tp1(sample_prefix, tmp_path, reference):
    train(2, overrides(sample_prefix, tmp_path, **{"parallel.tensor_parallel_size": 2, "training.exit_interval": 3}),
          tmp_path)
    tp1 = train(1, overrides(sample_prefix, tmp_path), tmp_path)
    assert tp1["resumed_from"] == 3
    assert_losses_close(tp1["losses"], {s: reference["losses"][s] for s in (4, 5)}, 1e-4)


def test_bf16_run_checkpoints_and_converts(sample_prefix, tmp_path, reference):
    """The GPU default precision on CPU: DeepSpeed's bf16 engine, learning dynamics, a verified export, and a
    resume at another layout (DeepSpeed names bf16 ZeRO files differently)."""
    from convert_to_hf import main as to_hf_main

    from megapico.convert.checkpoint_reader import load_checkpoint

    result = train(1, overrides(sample_prefix, tmp_path, **{
        "training.precision": "bf16", "training.max_steps": 2, "training.lr_warmup_steps": 0,
        "checkpointing.learning_dynamics.enabled": True, "checkpointing.learning_dynamics.batch_size": 4}), tmp_path)
    assert abs(result["losses"][1] - reference["losses"][1]) < 0.05  # same data and init, bf16 rounding only
    checkpoints = tmp_path / "runs" / "megapico-run" / "checkpoints"
    w_2 = torch.load(checkpoints / "step_2" / "learning_dynamics" / "train_activations.pt")["layers.1.swiglu.w_2"]
    assert w_2.dtype == torch.float32 and w_2.shape == (4, 96)
    checkpoint = load_checkpoint(checkpoints / "latest")
    assert checkpoint.source.startswith("fp32 master weights")
    assert to_hf_main(["--checkpoint", str(checkpoints / "latest"), "--output", str(tmp_path / "hf")]) == 0
    resumed = train(2, overrides(sample_prefix, tmp_path, **{
        "training.precision": "bf16", "training.max_steps": 3, "training.lr_warmup_steps": 0,
        "training.change_schedule_on_resume": True, "parallel.tensor_parallel_size": 2}), tmp_path)
    assert resumed["resumed_from"] == 2 and math.isfinite(resumed["losses"][3])


def test_eval_results_and_wandb_offline_files(sample_prefix, tmp_path):
    result = train(1, overrides(sample_prefix, tmp_path, **{"logging.wandb_mode": "offline",
                                                             "evaluation.interval": 2}), tmp_path)
    run = tmp_path / "runs" / "megapico-run"
    for step in (2, 4, 5):
        assert json.loads((run / "eval_results" / f"step_{step}.json").read_text()) == {
            "valid": pytest.approx(result["perplexities"][step])}
    records = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1, "no offline wandb run in the run directory"
    logged = records[0].read_bytes()  # wandb's binary record log: the history keys are stored as text
    for metric in (b"train/loss", b"trainer/learning_rate", b"eval/valid"):
        assert metric in logged
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").read_text() == f"step_{STEPS}"


def test_pretrain_cli_under_the_deepspeed_launcher(sample_prefix, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(29500 + os.getpid() % 1000), str(REPO / "pretrain.py"),
               *overrides(sample_prefix, tmp_path, **{"parallel.tensor_parallel_size": 2, "training.max_steps": 2})]
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 2/2 | loss" in out.stdout and "eval valid perplexity" in out.stdout


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_pretrain_cli_under_python_and_torchrun(sample_prefix, tmp_path, launcher):
    settings = overrides(sample_prefix, tmp_path, **{"training.max_steps": 1, "training.lr_warmup_steps": 0,
                                                      "evaluation.max_sequences": 4})
    prefix = [sys.executable] if launcher == "python" else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
        str(30500 + os.getpid() % 1000)]
    out = subprocess.run([*prefix, str(REPO / "pretrain.py"), *settings], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 1/1 | loss" in out.stdout


def test_pretrain_cli_config_typo_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "training.learning_rate=1"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: command line: unknown config key 'training.learning_rate' (check the "
                                  "spelling against megapico/config/schema.py)")


def test_nan_loss_stops_naming_the_step_or_is_skipped(sample_prefix, tmp_path, reference):
    with pytest.raises(Exception, match="step 2: loss is nan"):
        train(1, overrides(sample_prefix, tmp_path), tmp_path, fault="nan_at_step_2")
    skipped = train(1, overrides(sample_prefix, tmp_path / "skip", **{"training.nan_policy": "skip"}), tmp_path,
                    fault="nan_at_step_2")
    assert skipped["losses"][1] == reference["losses"][1]
    assert all(math.isfinite(loss) for step, loss in skipped["losses"].items() if step != 2)


def test_crash_inside_save_resumes_from_the_previous_checkpoint(sample_prefix, tmp_path, reference):
    settings = {"checkpointing.save_interval": 2}
    with pytest.raises(Exception, match="killed inside save_checkpoint"):
        train(1, overrides(sample_prefix, tmp_path, **settings), tmp_path, fault="crash_in_second_save")
    checkpoints = tmp_path / "runs" / "megapico-run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_2"  # step_4 was being written: not pointed at
    resumed = train(1, overrides(sample_prefix, tmp_path, **settings), tmp_path)
    assert resumed["resumed_from"] == 2
    assert resumed["losses"] == {s: reference["losses"][s] for s in (3, 4, 5)}
