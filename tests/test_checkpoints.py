"""Checkpoints that can be trusted: manifests, verification before loading, fall-back, explicit resume errors on
every rank, one run record (metrics.jsonl, one wandb run) across launches, retention."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from conftest import training_overrides as overrides
from distributed import train

from megapico.checkpoint.manifest import read_manifest, sha256_of
from megapico.parallel import free_port

STEPS = 5


@pytest.fixture(scope="module")
def reference(sample_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    return train(1, overrides(sample_prefix, tmp), tmp)


@pytest.fixture(scope="module")
def stopped_at_4(sample_prefix, tmp_path_factory):
    """A run saved at steps 2 and 4 that stopped at 4 (exit_interval)."""
    tmp = tmp_path_factory.mktemp("stopped")
    train(1, overrides(sample_prefix, tmp, **{"checkpointing.save_interval": 2, "training.exit_interval": 4}), tmp)
    return tmp


def test_manifest_lists_every_file_with_size_and_sha256(stopped_at_4):
    step = stopped_at_4 / "runs" / "megapico-run" / "checkpoints" / "step_4"
    manifest = read_manifest(step)
    files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert manifest["kind"] == "full" and sorted(manifest["files"]) == files
    assert {"megapico_state.json", "config.yaml", "rng_rank0.pt", "mp_rank_00_model_states.pt"} <= set(files)
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (step / name).stat().st_size, "sha256": sha256_of(step / name)}
    rng = torch.load(step / "rng_rank0.pt", weights_only=True)  # no pickled objects in megapico's own files
    assert set(rng) >= {"python", "numpy", "torch"}


def _damage(path, how):
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "bit-flipped":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.mark.parametrize("how,expected", [("truncated", "bytes, the manifest says"),
                                          ("bit-flipped", "sha256 differs from the manifest"),
                                          ("missing", "missing")])
def test_damaged_latest_falls_back_and_training_matches_an_uninterrupted_run(
        sample_prefix, stopped_at_4, reference, tmp_path, capfd, how, expected):
    shutil.copytree(stopped_at_4 / "runs", tmp_path / "runs")
    checkpoints = tmp_path / "runs" / "megapico-run" / "checkpoints"
    damaged = checkpoints / "step_4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _damage(damaged, how)
    capfd.readouterr()
    resumed = train(1, overrides(sample_prefix, tmp_path, **{"checkpointing.save_interval": 2}), tmp_path)
    out = capfd.readouterr().out
    assert resumed["resumed_from"] == 2
    assert f"warning: checkpoint step_4: {damaged}" in out and expected in out
    assert f"resumed from {checkpoints / 'step_2'}: step 2" in out
    assert resumed["losses"] == {s: reference["losses"][s] for s in (3, 4, 5)}  # bit for bit
    records = [json.loads(line) for line in (tmp_path / "runs" / "megapico-run" / "metrics.jsonl").open()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4, 5]  # steps 3-4 of the first launch were replaced, not duplicated


def test_explicitly_named_damaged_checkpoint_is_a_one_line_error_on_every_rank(sample_prefix, stopped_at_4,
                                                                                tmp_path):
    shutil.copytree(stopped_at_4 / "runs", tmp_path / "runs")
    step_4 = tmp_path / "runs" / "megapico-run" / "checkpoints" / "step_4"
    _damage(step_4 / "mp_rank_00_model_states.pt", "truncated")
    settings = overrides(sample_prefix, tmp_path, **{"checkpointing.resume": "step_4", "training.micro_batch_size": 2})
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, str(REPO / "pretrain.py"), *settings], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in range(2)]
    results = [rank.communicate(timeout=300) for rank in ranks]  # no hang: both return on their own
    for process, (_, stderr) in zip(ranks, results, strict=True):
        assert process.returncode == 1 and "Traceback" not in stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        damaged = step_4 / "mp_rank_00_model_states.pt"
        assert len(errors) == 1 and errors[0].startswith(
            f"error: cannot resume from {step_4} (checkpointing.resume=step_4): {damaged}: ")


def test_a_kill_while_writing_the_manifest_leaves_latest_on_the_previous_checkpoint(sample_prefix, tmp_path,
                                                                                     reference):
    settings = overrides(sample_prefix, tmp_path, **{"checkpointing.save_interval": 2})
    with pytest.raises(Exception, match="killed while writing the manifest"):
        train(1, settings, tmp_path, fault="crash_in_second_manifest")
    checkpoints = tmp_path / "runs" / "megapico-run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_2" and read_manifest(checkpoints / "step_4") is None
    resumed = train(1, settings, tmp_path)
    assert resumed["resumed_from"] == 2 and resumed["losses"] == {s: reference["losses"][s] for s in (3, 4, 5)}


def test_one_wandb_run_across_launches(sample_prefix, tmp_path):
    settings = {"logging.wandb_mode": "offline", "training.exit_interval": 3}
    train(1, overrides(sample_prefix, tmp_path, **settings), tmp_path)
    train(1, overrides(sample_prefix, tmp_path, **settings), tmp_path)
    run = tmp_path / "runs" / "megapico-run"
    run_id = (run / "wandb_id.txt").read_text()
    launches = sorted((run / "wandb").glob("offline-run-*"))
    assert len(launches) == 2 and all(path.name.endswith(f"-{run_id}") for path in launches)


def test_keep_last_2_prunes_older_checkpoints_and_the_run_still_converts_for_every_step(sample_prefix, tmp_path,
                                                                                        capfd):
    from convert_to_hf import main as to_hf_main
    from safetensors.torch import load_file

    train(1, overrides(sample_prefix, tmp_path, **{
        "checkpointing.save_interval": 1, "checkpointing.keep_last": 2, "evaluation.interval": 1,
        "checkpointing.learning_dynamics.enabled": True, "checkpointing.learning_dynamics.batch_size": 4}), tmp_path)
    out = capfd.readouterr().out
    run = tmp_path / "runs" / "megapico-run"
    kinds = {step: read_manifest(run / "checkpoints" / f"step_{step}")["kind"] for step in range(STEPS + 1)}
    assert kinds == {0: "pruned", 1: "pruned", 2: "pruned", 3: "pruned", 4: "full", 5: "full"}
    for step in range(4):
        directory = run / "checkpoints" / f"step_{step}"
        assert not list(directory.glob("*zero_pp_rank_*")) and not list(directory.glob("mp_rank_*"))
        assert (directory / "hf" / "model.safetensors").is_file()
        assert (directory / "learning_dynamics" / "train_gradients.pt").is_file()
        assert f"checkpoint step_{step} pruned (checkpointing.keep_last=2): " in out
    assert f"checkpoint {run / 'checkpoints' / 'step_5'}: " in out and " MiB" in out  # the disk used, per save
    assert to_hf_main(["--run-dir", str(run), "--output", str(tmp_path / "pico")]) == 0
    for step in range(STEPS + 1):
        exported = tmp_path / "pico" / "megapico-run" / "checkpoints" / f"step_{step}"
        assert (exported / "learning_dynamics" / "val_weights.pt").is_file()
        weights = load_file(exported / "model.safetensors")
        assert weights["pico_decoder.output_norm.weight"].dtype == torch.float32
    step_1 = load_file(run / "checkpoints" / "step_1" / "hf" / "model.safetensors")
    step_4 = load_file(tmp_path / "pico" / "megapico-run" / "checkpoints" / "step_4" / "model.safetensors")
    assert not torch.equal(step_1["pico_decoder.output_norm.weight"], step_4["pico_decoder.output_norm.weight"])


def test_plot_run_draws_the_metrics_record(sample_prefix, tmp_path, capsys):
    from plot_run import main as plot_main

    train(1, overrides(sample_prefix, tmp_path, **{"evaluation.interval": 2}), tmp_path)
    run = tmp_path / "runs" / "megapico-run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if "eval/valid" in r] == [2, 4, 5]
    assert all("trainer/grad_norm" in r and "trainer/tokens_per_second" in r for r in records if r["step"] == 5
               and "train/loss" in r)
    assert plot_main([str(run)]) == 0
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(tmp_path / "nothing")]) == 1
    assert "metrics.jsonl: no metrics record" in capsys.readouterr().err


def test_size_only_verification_catches_truncation_not_bit_flips(tmp_path):
    from megapico.checkpoint.manifest import verify_checkpoint, write_manifest

    torch.save({"w": torch.zeros(1000)}, tmp_path / "mp_rank_00_model_states.pt")
    (tmp_path / "learning_dynamics").mkdir()
    torch.save({"w": torch.zeros(10)}, tmp_path / "learning_dynamics" / "train_weights.pt")
    size = (tmp_path / "mp_rank_00_model_states.pt").stat().st_size
    write_manifest(tmp_path, tp_size=1)
    assert verify_checkpoint(tmp_path, 1) is None and verify_checkpoint(tmp_path, 1, full_hash=False) is None
    _damage(tmp_path / "learning_dynamics" / "train_weights.pt", "bit-flipped")
    assert verify_checkpoint(tmp_path, 1, full_hash=False) is None  # checkpointing.verify=size: sizes only
    assert "train_weights.pt: sha256 differs" in verify_checkpoint(tmp_path, 1)
    _damage(tmp_path / "mp_rank_00_model_states.pt", "truncated")
    assert verify_checkpoint(tmp_path, 1, full_hash=False).endswith(
        f"mp_rank_00_model_states.pt: {size // 2} bytes, the manifest says {size} (truncated?)")


def test_keep_last_keeps_the_newest_saved_not_the_highest_step(tmp_path, monkeypatch):
    """After a resume from an earlier step (checkpointing.resume=step_N), the old run's later steps are still on
    disk: retention prunes them before the new run's checkpoints, which were saved after them."""
    import os

    from megapico.convert import retention

    for age, step in enumerate((4, 6, 2, 3)):  # step_4 and step_6 from the old run, then step_2 and step_3 anew
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "manifest.json").write_text(json.dumps({"kind": "full", "files": {}}))
        os.utime(tmp_path / f"step_{step}" / "manifest.json", ns=(age * 10**9, age * 10**9))
    pruned = []
    monkeypatch.setattr(retention, "prune_checkpoint", lambda directory: pruned.append(directory.name) or (0, 0))
    retention.keep_last_checkpoints(tmp_path, 2)
    assert pruned == ["step_4", "step_6"]
