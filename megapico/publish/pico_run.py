"""Publish a pico run directory as pico-train does: the one tools/convert_to_hf.py --run-dir writes, or pico-train's
own (a run whose upload died on a network error, or one that never published).

A pico run directory: training_config.yaml, checkpoints/step_N/ (config.json, model.safetensors, pico_decoder.py,
the tokenizer files, learning_dynamics/, and in pico-train's own runs fabric_state/), checkpoints/latest -> step_N
and eval_results/step_N.json. Per step N ascending, pico-train's commits: `Saving HF Model -- Step N`, at the first
step `Saving Tokenizer` and `Saving Training Config`, `Saving Fabric Checkpoint -- Step N` (pico-train's training
state, per training_state), `Saving Evaluation Results -- Step N`, `Saving Learning Dynamics Data (train|val)`, and
megapico's `Saving Analysis Results -- Step N` (analysis_results/, which the converter carries); the branch is the
run name of training_config.yaml. Idempotent as for a megapico run (hub.py): titles are compared.

The directory is received data, so nothing in it passes on as it is found: the HF files are made anew
(convert.copy_pruned_export: config.json from pico's model keys read as data, auto_map and any other key left
behind; the weights checked against them and saved again; the tokenizer re-serialized; megapico's own
pico_decoder.py), training_config.yaml and the eval results are parsed and dumped anew, the learning dynamics are
read through the checkpoint reader and written anew, and fabric_state/ is read whole through the reader (its weights
must equal model.safetensors) with only the files read sent. The one link accepted is pico's own
`checkpoints/latest`, relative, to a step directory beside it; it is never followed.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml
from huggingface_hub import HfApi

from megapico.checkpoint.files import read_checkpoint_file
from megapico.checkpoint.paths import CHECKPOINT_TAG, CheckpointError, checkpoint_tag
from megapico.checkpoint.reshard import zero_shard_path
from megapico.checkpoint.training_state import STATE_FILE, step_of
from megapico.convert.convert import copy_pruned_export
from megapico.convert.from_pico_train import read_pico_train_checkpoint
from megapico.convert.hf_export import MODELLING_FILE, TOKENIZER_FILES
from megapico.convert.received import pico_model_config, write_checked_learning_dynamics
from megapico.publish.background import run_branch
from megapico.publish.hub import (
    MODEL_FILES,
    Artifact,
    Files,
    Local,
    Publication,
    check_options,
    dynamics_files,
    export_files,
    private_directory,
    publish_run,
    read_bounded,
    request_timeout,
    step_artifacts,
)

TRAINING_CONFIG = "training_config.yaml"
FABRIC_DIR = "fabric_state"
MAX_CONFIG_BYTES = 1 << 20


def fabric_title(step: int) -> str:
    return f"Saving Fabric Checkpoint -- Step {step}"


def is_pico_run(run_dir: Path) -> bool:
    """A pico run directory (training_config.yaml, checkpoints without megapico's state file), not a megapico run."""
    return (run_dir / TRAINING_CONFIG).is_file() and not any((run_dir / "checkpoints").glob(f"step_*/{STATE_FILE}"))


def refuse_links_but_latest(run_dir: Path) -> None:
    """A pico run directory holds plain files and folders, and pico's `checkpoints/latest`, which may be a relative
    link naming a step_N directory beside it (a plain directory). Any other link (or that one pointing elsewhere)
    would steer a read outside: a one-line CheckpointError naming it. wandb's own folder is never read."""
    latest = run_dir / "checkpoints" / "latest"
    if run_dir.is_symlink():
        raise CheckpointError(f"{run_dir}: a symbolic link (to {os.readlink(run_dir)}); use the run directory itself")
    if latest.is_symlink():
        target = os.readlink(latest)
        step_dir = latest.parent / target
        if not (CHECKPOINT_TAG.fullmatch(target) and target.startswith("step_") and step_dir.is_dir()
                and not step_dir.is_symlink()):
            raise CheckpointError(f"{latest}: a link to {target[:80]}; pico's latest names a step_N directory beside "
                                  f"it, refusing it (remove the link)")
    for root, directories, files in os.walk(run_dir):
        for name in [*directories, *files]:
            path = Path(root) / name
            if path.is_symlink() and path != latest:
                raise CheckpointError(f"{path}: a symbolic link (to {os.readlink(path)}); a pico run directory holds "
                                      f"plain files and pico's checkpoints/latest, refusing it (remove the link)")
        if Path(root) == run_dir and "wandb" in directories:
            directories.remove("wandb")


@dataclass
class PicoStep:
    directory: Path
    step: int


def pico_steps(run_dir: Path) -> list[PicoStep]:
    """The run's checkpoints/step_N directories holding an HF model, by step."""
    root = run_dir / "checkpoints"
    steps = sorted((PicoStep(path, step_of(path.name)) for path in root.glob("step_*")
                    if step_of(path.name) >= 0 and (path / "config.json").is_file()), key=lambda step: step.step)
    if not steps:
        raise CheckpointError(f"{root}: no checkpoints to publish (step_N/ with config.json and model.safetensors)")
    return steps


def read_training_config(run_dir: Path) -> dict:
    """training_config.yaml as plain YAML data (no tag that builds an object); it must name checkpointing.run_name."""
    try:
        config = yaml.safe_load(read_bounded(run_dir, TRAINING_CONFIG, MAX_CONFIG_BYTES))
    except yaml.YAMLError as err:
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{run_dir / TRAINING_CONFIG}: not plain YAML ({line[:120]}); refusing it") from None
    checkpointing = config.get("checkpointing") if isinstance(config, dict) else None
    if not isinstance(checkpointing, dict) or not isinstance(checkpointing.get("run_name"), str):
        raise CheckpointError(f"{run_dir / TRAINING_CONFIG}: no checkpointing.run_name; not pico's training config")
    return config


@dataclass
class PicoRun:
    """What a pico run directory has to publish, every file generated or checked into `workdir`."""

    run_dir: Path
    workdir: Path
    training_state: str
    tokenizer: str | None
    config: dict

    def export(self, step: PicoStep) -> Path:
        """The step's HF files made anew in the private directory (convert.copy_pruned_export: config.json from
        pico's model keys read as data, the weights checked against them, the tokenizer re-serialized, megapico's
        pico_decoder.py)."""
        target = self.workdir / "export" / step.directory.name
        if not target.is_dir():
            target.parent.mkdir(exist_ok=True)
            copy_pruned_export(step.directory, target, tokenizer=self.tokenizer)
        return target

    def model_files(self, step: PicoStep) -> Files:
        return {**export_files(self.export(step), MODEL_FILES), "pico_decoder.py": MODELLING_FILE.read_bytes()}

    def tokenizer_files(self, step: PicoStep) -> Files:
        return export_files(self.export(step), TOKENIZER_FILES)

    def config_files(self) -> Files:
        return {TRAINING_CONFIG: yaml.safe_dump(self.config, sort_keys=False).encode()}

    def fabric_files(self, step: PicoStep) -> Files:
        """fabric_state/ as pico-train wrote it, only the files read_pico_train_checkpoint reads through the
        checkpoint reader (weights checked equal to model.safetensors); DeepSpeed's `latest` tag written anew."""
        read_pico_train_checkpoint(step.directory)
        fabric = step.directory / FABRIC_DIR
        if (fabric / "checkpoint.pt").is_file():
            return {f"{FABRIC_DIR}/checkpoint.pt": Local(fabric, "checkpoint.pt")}
        tag = checkpoint_tag(read_bounded(fabric, "latest", 256).decode(errors="replace"), fabric / "latest")
        client = read_checkpoint_file(fabric / tag / "mp_rank_00_model_states.pt")
        bf16 = any((fabric / tag).glob("bf16_zero_pp_rank_*_optim_states.pt"))
        shards = len(list((fabric / tag).glob(f"{'bf16_' if bf16 else ''}zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        names = [f"{tag}/mp_rank_00_model_states.pt"] + [
            f"{tag}/{zero_shard_path(Path(), rank, 0, bf16)}" for rank in range(int(client.get("dp_world_size",
                                                                                              shards)))]
        return {f"{FABRIC_DIR}/latest": tag.encode(), **{f"{FABRIC_DIR}/{name}": Local(fabric, name) for name in names}}

    def dynamics_files(self, step: PicoStep, split: str) -> Files:
        target = self.workdir / "learning_dynamics" / step.directory.name
        if not target.is_dir():
            target.parent.mkdir(exist_ok=True)
            write_checked_learning_dynamics(step.directory / "learning_dynamics", target,
                                            pico_model_config(step.directory / "config.json"))
        return dynamics_files(target, split)

    def artifacts(self, steps: list[PicoStep]) -> list[Artifact]:
        """pico-train's commits for every step, in its order."""
        with_fabric = [step.step for step in steps if (step.directory / FABRIC_DIR).is_dir()]
        fabric_steps = (set() if self.training_state == "never" or not with_fabric else
                        set(with_fabric) if self.training_state == "every" else {with_fabric[-1]})
        return [artifact for index, step in enumerate(steps) for artifact in step_artifacts(
            self.run_dir, step.step, step.directory, index == 0, partial(self.model_files, step),
            partial(self.tokenizer_files, step), self.config_files, partial(self.dynamics_files, step),
            Artifact(fabric_title(step.step), step.step, partial(self.fabric_files, step), (f"{FABRIC_DIR}/",))
            if step.step in fabric_steps else None)]


def publish_pico_run(run_dir: Path, repo_id: str, branch: str | None = None, update_main: bool = False,
                     training_state: str = "last", collection_slug: str = "", retries: int = 5, *,
                     live: bool = False, tokenizer: str | None = None, private: bool = True, backoff_s: float = 2.0,
                     timeout_s: float = 300.0, endpoint: str | None = None, token: str | None = None,
                     log: Callable[[str], None] = lambda line: None) -> list[str]:
    """publish_run for a pico run directory (same options; `live` has no meaning for a finished pico run, and
    training_state says which steps send pico-train's fabric_state/). The branch defaults to training_config.yaml's
    checkpointing.run_name."""
    check_options(training_state, retries)
    run_dir = Path(run_dir)
    refuse_links_but_latest(run_dir)
    config = read_training_config(run_dir)
    branch = run_branch(branch if branch is not None else config["checkpointing"]["run_name"])
    steps = pico_steps(run_dir)
    with private_directory() as workdir:
        publication = Publication(HfApi(endpoint=endpoint, token=token), run_dir, repo_id, branch, training_state,
                                  retries, backoff_s, live, tokenizer, log, workdir, private)
        source = PicoRun(run_dir, workdir, training_state, tokenizer, config)
        with request_timeout(timeout_s):
            publication.send(publication.with_analysis(source.artifacts(steps)), collection_slug, update_main,
                             (f"{FABRIC_DIR}/", "learning_dynamics/"))
    return publication.lines


def publish_directory(run_dir: Path, repo_id: str, *args, **options) -> list[str]:  # noqa: ANN002, ANN003
    """publish_run or publish_pico_run, whichever kind of run directory `run_dir` is."""
    return (publish_pico_run if is_pico_run(Path(run_dir)) else publish_run)(run_dir, repo_id, *args, **options)
