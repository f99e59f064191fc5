"""Received checkpoints and run directories are data: a pickle that would run code is refused before any of it runs,
names and paths from files stay inside their roots, exports carry megapico's own modelling code, configs are not
interpolated. Each attack is a real file, and each test checks that its payload never ran."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from conftest import training_overrides as overrides
from convert_to_hf import main as to_hf_main
from distributed import train
from generate import main as generate_main
from test_foreign_checkpoints import PICO_CHECKPOINTS, needs_pico_checkpoints, pico_recipe

from megapico.checkpoint.files import read_checkpoint_file, use_data_only_loads
from megapico.checkpoint.manifest import verify_checkpoint, write_manifest
from megapico.checkpoint.paths import CheckpointError, open_append
from megapico.config import ConfigError, load_config, save_config
from megapico.convert.checkpoint_reader import load_checkpoint, resolve_checkpoint_dir
from megapico.convert.convert import copy_pruned_export
from megapico.convert.hf_export import MODELLING_FILE
from megapico.parallel import free_port


class Payload:
    """Unpickling this runs `touch marker`: what a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison(path: Path, marker: Path) -> None:
    """Add one pickled object that runs code to a real checkpoint file (read here by the test, trusting itself)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["extra"] = Payload(marker)
    torch.save(state, path)


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """The attack file is real: torch.load(weights_only=False), what every reader used, runs it."""
    torch.save({"weight": torch.zeros(2), "extra": Payload(tmp_path / "ran")}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


@needs_pico_checkpoints
@pytest.mark.parametrize("layout, name, kind", [
    ("one-device-fp32", "checkpoint.pt", "pico one-device"),
    ("zero2-bf16", "checkpoint/mp_rank_00_model_states.pt", "model states"),
    ("zero2-bf16", "checkpoint/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero partition"),
])
def test_a_malicious_pico_train_checkpoint_is_refused_by_the_importer(tmp_path, capsys, layout, name, kind):
    from convert_from_pico_train import main as convert

    checkpoint = tmp_path / "step_4"
    shutil.copytree(PICO_CHECKPOINTS / layout / "step_4", checkpoint)
    marker = tmp_path / "payload-ran"
    poison(checkpoint / "fabric_state" / name, marker)
    settings = [item for item in pico_recipe(("rows", "paloma"), tmp_path, "fp32") if not item.startswith("checkp")]
    assert convert([str(checkpoint), "--output", str(tmp_path / "runs" / "imported"), *settings]) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {checkpoint / 'fabric_state' / name}: refused, it asks to load the Python global "
                     f"posix.system, which no {kind} file needs (a checkpoint is read as data, never as code); get "
                     f"the checkpoint from its author again")
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def megapico_run(sample_prefix, tmp_path_factory):
    """A 2-step megapico run at DP=2 (two ZeRO partition files), saved at step 2."""
    tmp = tmp_path_factory.mktemp("megapico-run")
    train(2, overrides(sample_prefix, tmp, **{"training.max_steps": 2, "training.micro_batch_size": 2,
                                              "checkpointing.save_interval": 2}), tmp)
    return tmp / "runs"


def received_copy(megapico_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(megapico_run, tmp_path / "runs")
    return tmp_path / "runs" / "megapico-run" / "checkpoints" / "step_2"


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_a_malicious_megapico_checkpoint_is_refused_by_convert_generate_and_resume(megapico_run, sample_prefix,
                                                                                  tmp_path, capsys, name):
    step = received_copy(megapico_run, tmp_path)
    marker = tmp_path / "payload-ran"
    poison(step / name, marker)
    write_manifest(step, 1, collective=False)  # the sender rewrites the manifest: it proves nothing
    expected = f"{step / name}: refused, it asks to load the Python global posix.system"

    assert to_hf_main(["--checkpoint", str(step), "--output", str(tmp_path / "hf")]) == 1
    assert expected in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert generate_main(["--checkpoint", str(step), "--prompt", "The river"]) == 1
    assert expected in capsys.readouterr().err

    # resume (checkpointing.resume=auto, the default): every rank stops with the same line, no fall-back past it
    settings = overrides(sample_prefix, tmp_path, **{"training.max_steps": 3, "training.micro_batch_size": 2})
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, str(REPO / "pretrain.py"), *settings], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in range(2)]
    for process in ranks:
        _, stderr = process.communicate(timeout=300)
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert process.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
        assert len(errors) == 1 and expected in errors[0], errors
    assert not marker.exists()


def test_deepspeeds_own_load_reads_as_data(tmp_path):
    """engine.load_checkpoint goes through the engine's checkpoint engine: megapico replaces its torch.load."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    use_data_only_loads(engine)
    torch.save({"module": {"w": torch.ones(2, requires_grad=True)}}, tmp_path / "mp_rank_00_model_states.pt")
    write_manifest(tmp_path, 1, collective=False)  # it reads only what the checkpoint's manifest lists
    loaded = engine.checkpoint_engine.load(str(tmp_path / "mp_rank_00_model_states.pt"), map_location="cpu")
    assert torch.equal(loaded["module"]["w"], torch.ones(2)) and not loaded["module"]["w"].requires_grad
    poison(tmp_path / "mp_rank_00_model_states.pt", tmp_path / "ran")
    write_manifest(tmp_path, 1, collective=False)
    with pytest.raises(CheckpointError, match="refused, it asks to load the Python global posix.system"):
        engine.checkpoint_engine.load(str(tmp_path / "mp_rank_00_model_states.pt"))
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint_file(tmp_path / "mp_rank_00_model_states.pt")
    assert not (tmp_path / "ran").exists()


def test_a_run_name_that_leaves_the_output_is_refused_and_nothing_is_deleted(megapico_run, tmp_path, capsys):
    step = received_copy(megapico_run, tmp_path)
    victim = tmp_path / "victim"
    (victim / "precious").mkdir(parents=True)
    for directory in step.parent.glob("step_*"):
        config = directory / "config.yaml"
        config.write_text(config.read_text().replace("run_name: megapico-run", "run_name: ../victim"))
        write_manifest(directory, 1, collective=False)
    code = to_hf_main(["--run-dir", str(step.parent.parent), "--output", str(tmp_path / "out"), "--overwrite"])
    assert code == 1 and "checkpointing.run_name='../victim' is not a run name" in capsys.readouterr().err
    assert (victim / "precious").is_dir()
    with pytest.raises(ConfigError, match="is not a run name"):
        load_config(None, ["checkpointing.run_name=.."])


def test_links_in_a_received_run_are_never_followed(megapico_run, tmp_path, capsys):
    step = received_copy(megapico_run, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (step / "learning_dynamics").mkdir(exist_ok=True)
    (step / "learning_dynamics" / "val_weights.pt").unlink(missing_ok=True)
    (step / "learning_dynamics" / "val_weights.pt").symlink_to(secret)
    code = to_hf_main(["--run-dir", str(step.parent.parent), "--output", str(tmp_path / "out")])
    assert code == 1 and "val_weights.pt: a symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "out" / "megapico-run").exists()

    # a link among the files a manifest lists, and a manifest entry that leaves the checkpoint
    (step / "learning_dynamics" / "val_weights.pt").unlink()
    (step / "megapico_state.json").rename(step / "state.json")
    (step / "megapico_state.json").symlink_to(step / "state.json")
    assert "a symbolic link" in verify_checkpoint(step, 1)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["../../../secret.txt"] = {"bytes": 9, "sha256": "0" * 64}
    (step / "manifest.json").write_text(json.dumps(manifest))
    assert "lists '../../../secret.txt', which points outside its checkpoint" in verify_checkpoint(step, 1)

    # `latest` naming an absolute path, or anything but a checkpoint tag
    (step.parent / "latest").write_text(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a tag of the form step_N"):
        resolve_checkpoint_dir(step.parent / "latest")

    # writes into a run directory replace a link instead of writing through it
    (step.parent.parent / "config.yaml").unlink(missing_ok=True)
    (step.parent.parent / "config.yaml").symlink_to(secret)
    save_config(load_config(None, []), step.parent.parent / "config.yaml")
    assert secret.read_text() == "not yours" and not (step.parent.parent / "config.yaml").is_symlink()
    (step.parent.parent / "metrics.jsonl").unlink(missing_ok=True)
    (step.parent.parent / "metrics.jsonl").symlink_to(secret)
    with pytest.raises(CheckpointError, match="refusing to append through it"):
        open_append(step.parent.parent / "metrics.jsonl")
    assert secret.read_text() == "not yours"


def test_exports_carry_megapicos_modelling_file_and_generate_never_runs_a_directorys_code(megapico_run, tmp_path,
                                                                                          capsys):
    step = received_copy(megapico_run, tmp_path)
    assert to_hf_main(["--checkpoint", str(step), "--output", str(tmp_path / "hf")]) == 0
    marker = tmp_path / "payload-ran"
    hostile = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    (tmp_path / "hf" / "pico_decoder.py").write_text(hostile + MODELLING_FILE.read_text())
    capsys.readouterr()
    assert generate_main(["--hf", str(tmp_path / "hf"), "--prompt", "The river", "--max-new-tokens", "4"]) == 0
    assert not marker.exists()

    # a pruned checkpoint's kept export: its data files are copied, its modelling file is megapico's
    copy_pruned_export(tmp_path / "hf", tmp_path / "kept")
    assert (tmp_path / "kept" / "pico_decoder.py").read_text() == MODELLING_FILE.read_text()
    (tmp_path / "hf" / "config.json").rename(tmp_path / "config.json")
    (tmp_path / "hf" / "config.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="config.json: a symbolic link"):
        copy_pruned_export(tmp_path / "hf", tmp_path / "kept2")

    # another model type that ships code: only with --trust-remote-code
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "custom_lm", "architectures": ["CustomLM"],
                                                    "auto_map": {"AutoConfig": "custom.CustomConfig",
                                                                 "AutoModelForCausalLM": "custom.CustomLM"}}))
    (remote / "custom.py").write_text(hostile)
    assert generate_main(["--hf", str(remote), "--prompt", "The river"]) == 1
    assert "pass --trust-remote-code to run it" in capsys.readouterr().err and not marker.exists()


def test_a_received_config_is_never_interpolated(megapico_run, tmp_path, monkeypatch):
    step = received_copy(megapico_run, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    config = step / "config.yaml"
    config.write_text(config.read_text().replace("run_name: megapico-run", "run_name: ${oc.env:HF_TOKEN}"))
    write_manifest(step, 1, collective=False)
    with pytest.raises(ConfigError, match=r"'checkpointing.run_name' is an interpolation"):
        load_checkpoint(step)


class RawPointers:
    """numpy's own constructor, called with the sender's bytes: an object array whose pointers are 0x4141..."""

    def __reduce__(self):
        return np.ndarray, ((2,), "O", b"A" * 16)


@needs_pico_checkpoints
def test_numpy_in_a_pico_one_device_file_is_inert(tmp_path, capsys):
    """numpy's globals are what pico-train's one-device file legitimately names (its RNG state); a sender can call
    them with its own bytes. They are read as inert stand-ins: the importer says the layout is wrong instead of
    dereferencing the sender's pointers (which crashed the process)."""
    from convert_from_pico_train import main as convert

    checkpoint = tmp_path / "step_4"
    shutil.copytree(PICO_CHECKPOINTS / "one-device-fp32" / "step_4", checkpoint, ignore=shutil.ignore_patterns("*.pt"))
    state = torch.load(PICO_CHECKPOINTS / "one-device-fp32" / "step_4" / "fabric_state" / "checkpoint.pt",
                       weights_only=False)
    state["_optimizer"]["param_groups"] = RawPointers()
    state["_rng_states"]["numpy"] = RawPointers()
    torch.save(state, checkpoint / "fabric_state" / "checkpoint.pt")
    settings = [item for item in pico_recipe(("rows", "paloma"), tmp_path, "fp32") if not item.startswith("checkp")]
    assert convert([str(checkpoint), "--output", str(tmp_path / "runs" / "imported"), *settings]) == 1
    error = capsys.readouterr().err.strip()
    assert "not the layout of pico-train's one-device checkpoint" in error and "\n" not in error, error
    loaded = read_checkpoint_file(checkpoint / "fabric_state" / "checkpoint.pt")
    assert type(loaded["_rng_states"]["numpy"]).__name__ == "InertNumpy"


def test_links_planted_in_a_received_run_steer_nothing(megapico_run, sample_prefix, tmp_path, capsys):
    """A link for a directory the run writes into (checkpoints/), at a temporary name a write would use, or in a
    pruned checkpoint's export: training and conversion refuse the run, nothing outside it changes; a learning-dynamics
    pickle that would run code is not passed on to pico-analyze."""
    step = received_copy(megapico_run, tmp_path)
    run_dir = step.parent.parent
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("mine")

    # a temporary name a write could use: writes create their own, under a random name
    (run_dir / f".config.yaml.tmp-{os.getpid()}").symlink_to(victim / "precious")
    save_config(load_config(None, []), run_dir / "config.yaml")
    assert (victim / "precious").read_text() == "mine"
    (run_dir / f".config.yaml.tmp-{os.getpid()}").unlink()

    # a pickle in learning_dynamics/ that is none of pico's files: ignored, never read nor passed on
    (step / "learning_dynamics").mkdir(exist_ok=True)
    torch.save({"w": torch.zeros(1), "extra": Payload(tmp_path / "ran")}, step / "learning_dynamics" / "more.pt")
    assert to_hf_main(["--run-dir", str(run_dir), "--output", str(tmp_path / "out")]) == 0
    assert not list((tmp_path / "out").rglob("more.pt")) and not (tmp_path / "ran").exists()
    (step / "learning_dynamics" / "more.pt").unlink()

    # checkpoints/ itself a link into someone else's run
    shutil.move(run_dir / "checkpoints", victim / "checkpoints")
    (run_dir / "checkpoints").symlink_to(victim / "checkpoints")
    before = sorted(str(p) for p in victim.rglob("*"))
    with pytest.raises(Exception, match=r"checkpoints: a symbolic link \(to .*victim/checkpoints\); a run directory "
                                        r"holds plain files"):
        train(1, overrides(sample_prefix, tmp_path, **{"training.max_steps": 3, "training.micro_batch_size": 2,
                                                       "training.change_schedule_on_resume": True}), tmp_path)
    assert to_hf_main(["--run-dir", str(run_dir), "--output", str(tmp_path / "out")]) == 1
    assert "checkpoints: a symbolic link" in capsys.readouterr().err
    assert sorted(str(p) for p in victim.rglob("*")) == before and not (tmp_path / "ran").exists()
