"""Save and resume a training run: DeepSpeed's engine checkpoint plus megapico's own state.

Layout: runs/{run}/checkpoints/step_{N}/ holds DeepSpeed's files (mp_rank_XX_model_states.pt,
[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt), megapico_state.json (step, consumed samples, layout, tokenizer),
config.yaml, rng_rank{R}.pt for every rank (tensors and numbers only: loads with weights_only=True) and
manifest.json (every file's size and sha256, megapico/checkpoint/manifest.py). The manifest is written once
every rank has finished, and only then does rank 0 replace `checkpoints/latest` (DeepSpeed's tag file)
atomically, so a run killed during a save resumes from the previous complete checkpoint.

Resume (checkpointing.resume): `auto` takes `latest` if it verifies, else the newest earlier checkpoint that does
(each failure reported with the file named), else starts fresh when there was none; `true` needs `latest` to
verify; `step_N` needs that one; `false` starts fresh. A half-written checkpoint (no manifest.json: a stop or a
crash during its save, step 0's capture in the first minute of a run included) is never resumed from and never a
reason to refuse: `auto` passes over it, and where it is all there is, `auto` and `false` start afresh and remove it
(fresh_start_over_unfinished), so the same command always continues or restarts a stopped run.
A checkpoint is verified before any of its (pickled, code-executing) DeepSpeed files is opened: sizes always,
sha256 too unless checkpointing.verify=size.
"""

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megapico.checkpoint.files import REFUSED, read_checkpoint_file
from megapico.checkpoint.manifest import MANIFEST, is_pruned, read_manifest, verify_checkpoint, write_manifest
from megapico.checkpoint.paths import checkpoint_tag, replacing, write_text
from megapico.config import ConfigError, MegapicoConfig, load_config, save_config
from megapico.parallel import ParallelState, agree_across_ranks

STATE_FILE = "megapico_state.json"


class CheckpointIntegrityError(RuntimeError):
    """No checkpoint that may be resumed; raised on every rank with the same one-line message."""


@dataclass
class ResumePoint:
    step: int
    consumed_samples: int
    tag: str
    tensor_parallel_size: int
    data_parallel_size: int
    bf16: bool
    verified_files: int = 0
    rejected: tuple[str, ...] = ()  # newer checkpoints that failed verification, with the reason


def checkpoint_root(config: MegapicoConfig) -> Path:
    return Path(config.checkpointing.runs_dir) / config.checkpointing.run_name / "checkpoints"


def _rng_state() -> dict:
    """Every generator's state as tensors and numbers (torch.load(weights_only=True) takes it back)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = dict(python_version=version, python=torch.tensor(python_state, dtype=torch.int64), python_gauss=gauss,
                 numpy_kind=kind, numpy=torch.from_numpy(keys.astype(np.int64)), numpy_position=int(position),
                 numpy_has_gauss=int(has_gauss), numpy_cached=float(cached), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_kind"], state["numpy"].numpy().astype(np.uint32), state["numpy_position"],
                         state["numpy_has_gauss"], state["numpy_cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def clear_step_directory(config: MegapicoConfig, step: int) -> None:
    """Remove what a step directory holds before step `step` is saved into it (collective): an unfinished save of
    this step (the run fell back to an earlier checkpoint), or a link in a received run directory, which DeepSpeed
    and the learning-dynamics capture would otherwise write through."""
    directory = checkpoint_root(config) / f"step_{step}"
    if dist.get_rank() == 0 and (directory.is_symlink() or directory.exists()):
        directory.unlink() if directory.is_symlink() else shutil.rmtree(directory)
    dist.barrier()


def save_training_checkpoint(engine, config: MegapicoConfig, parallel: ParallelState, step: int,  # noqa: ANN001
                             consumed_samples: int) -> Path:
    root = checkpoint_root(config)
    tag = f"step_{step}"
    directory = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    with replacing(directory / f"rng_rank{dist.get_rank()}.pt") as tmp:
        torch.save(_rng_state(), tmp)
    if dist.get_rank() == 0:
        state = dict(step=step, consumed_samples=consumed_samples, tensor_parallel_size=parallel.tp_size,
                     data_parallel_size=parallel.dp_size, tokenizer=config.data.tokenizer,
                     bf16=bool(engine.bfloat16_enabled()))
        write_text(directory / STATE_FILE, json.dumps(state, indent=2))
        save_config(config, directory / "config.yaml")
    dist.barrier()  # every rank's files are on disk before they are hashed
    write_manifest(directory, parallel.tp_size)  # collective; `latest` may point here only once it exists
    dist.barrier()
    if dist.get_rank() == 0:
        write_text(root / "latest", tag)
    dist.barrier()
    return directory


def has_learning_dynamics(directory: Path) -> bool:
    """Whether the checkpoint's manifest lists learning dynamics (files written after it, by a launch stopped or
    killed while capturing them, do not count)."""
    manifest = read_manifest(directory)
    return manifest is not None and any(name.startswith("learning_dynamics/") for name in manifest["files"])


def _unfinished(path: Path) -> bool:
    """A step directory whose save never finished: the manifest, its last file, is not there (a damaged one is)."""
    return path.is_dir() and not (path / MANIFEST).exists()


def unfinished_checkpoints(config: MegapicoConfig) -> list[Path]:
    """Step directories whose save never finished (no manifest): never resumed from, named so nobody wonders."""
    return sorted((path for path in checkpoint_root(config).glob("step_*") if _unfinished(path)),
                  key=lambda path: step_of(path.name))


def fresh_start_over_unfinished(config: MegapicoConfig, unfinished: list[Path]) -> None:
    """A run starting afresh (resume auto or false) among only half-written checkpoints: rank 0 says so in one line
    and removes them, and a `latest` naming one of them (collective). Nothing was trained from them; left in place
    they would be taken for the new run's checkpoints by retention, conversion and the next launch."""
    root = checkpoint_root(config)
    if dist.get_rank() == 0 and unfinished:
        names = ", ".join(path.name for path in unfinished)
        print(f"starting afresh: {root} holds only half-written checkpoints ({names}: saves a stop or crash cut "
              f"short, never resumed from); removing them", flush=True)
        latest = root / "latest"
        if latest.is_file() and latest.read_text().strip() in {path.name for path in unfinished}:
            latest.unlink()
        for path in unfinished:
            shutil.rmtree(path)
    dist.barrier()


def step_of(tag: str) -> int:
    """N of a `step_N` checkpoint tag or directory name (-1 for any other name), for ordering checkpoints."""
    return int(tag.removeprefix("step_")) if tag.removeprefix("step_").isdigit() else -1


def _candidates(config: MegapicoConfig) -> list[str]:
    """Tags to try, best first: the one checkpointing.resume names, or `latest` then every older step_N."""
    mode, root = config.checkpointing.resume, checkpoint_root(config)
    if mode == "false":
        earlier = sorted((path.name for path in root.glob("step_*") if path.is_dir() and not _unfinished(path)),
                         key=step_of)
        if earlier:  # a new run among an old one's checkpoints: retention, `latest` and conversion would mix them
            raise CheckpointIntegrityError(f"{root}: holds checkpoints of an earlier run (newest {earlier[-1]}); "
                                           f"checkpointing.resume=false starts a new run, so move them away or "
                                           f"choose another checkpointing.run_name")
        return []
    if mode.startswith("step_"):
        return [mode]
    latest = checkpoint_tag((root / "latest").read_text(), root / "latest") if (root / "latest").is_file() else None
    if mode == "true":
        return [latest] if latest else []
    older = sorted((path.name for path in root.glob("step_*") if path.is_dir() and path.name != latest
                    and (latest is None or step_of(path.name) < step_of(latest))), key=step_of, reverse=True)
    return [tag for tag in ([latest] if latest else []) + older if not _unfinished(root / tag)]


def _point(directory: Path, tag: str) -> ResumePoint | str:
    try:
        state = json.loads((directory / STATE_FILE).read_text())
        return ResumePoint(state["step"], state["consumed_samples"], tag, state["tensor_parallel_size"],
                           state["data_parallel_size"], state["bf16"])
    except (OSError, json.JSONDecodeError, KeyError) as err:
        return f"{directory / STATE_FILE}: unreadable ({type(err).__name__})"


def agreed_resume_point(config: MegapicoConfig) -> ResumePoint | None:
    """The checkpoint to resume from, chosen identically on every rank (collective). Ranks that see different
    checkpoints (a node-local runs_dir, a `latest` that moved between reads) all stop with one error instead of
    one node resuming while the other starts fresh; a checkpoint that fails verification is skipped (auto) or
    stops every rank with a CheckpointIntegrityError naming the file."""
    root, mode = checkpoint_root(config), config.checkpointing.resume
    tags = _candidates(config)
    agree_across_ranks(f"the checkpoint to resume from in {root} (checkpointing.runs_dir must be on a filesystem "
                       f"that every node shares)", tags[0] if tags else "none")
    agree_across_ranks(f"the checkpoints in {root}", ",".join(tags))
    rejected = []
    for tag in tags:
        directory = root / tag
        point = _point(directory, tag) if directory.is_dir() else f"{directory}: no such checkpoint"
        if isinstance(point, str):
            problem = point
        elif is_pruned(directory):  # known before any hashing
            problem = f"{directory}: pruned by checkpointing.keep_last (only its HF export and learning dynamics)"
        else:
            problem = verify_checkpoint(directory, point.tensor_parallel_size,
                                        full_hash=config.checkpointing.verify == "hash")
        if problem is None:
            point.verified_files = len(read_manifest(directory)["files"])
            point.rejected = tuple(rejected)
            return point
        if mode != "auto" or REFUSED in problem:  # a file that would run code is an attack, not damage: stop
            raise CheckpointIntegrityError(f"cannot resume from {directory} (checkpointing.resume={mode}): {problem}")
        rejected.append(f"{tag}: {problem}")
    if mode == "true":
        raise CheckpointIntegrityError(f"{root / 'latest'}: no checkpoint to resume from (checkpointing.resume=true); "
                                       f"use resume=auto to start fresh when there is none")
    if rejected:
        raise CheckpointIntegrityError(f"no checkpoint in {root} verifies (newest: {rejected[0]}); move the damaged "
                                       f"ones away to start over, or name one with checkpointing.resume=step_N")
    return None


SCHEDULE_KEYS = ("max_steps", "lr", "min_lr", "lr_warmup_steps", "lr_decay_style")


def saved_run_config(config: MegapicoConfig, point: ResumePoint) -> MegapicoConfig:
    """The config a checkpoint was saved with (read as received data: no interpolation)."""
    return load_config(checkpoint_root(config) / point.tag / "config.yaml", received=True)


def continue_the_saved_run(config: MegapicoConfig, point: ResumePoint, dp_size: int) -> list[str]:
    """Make `config` continue the run the checkpoint is of, before anything is built: the same model (else a
    ConfigError), the same global batch at this layout (gradient accumulation derived as global batch / (micro
    batch x DP), or a ConfigError saying how to keep it; an explicit training.global_batch_size changes it), and
    the same LR schedule unless training.change_schedule_on_resume. Returns the lines to print."""
    saved = saved_run_config(config, point)
    where = checkpoint_root(config) / point.tag
    for name, value in vars(saved.model).items():
        if getattr(config.model, name) != value:
            raise ConfigError(f"model.{name}={getattr(config.model, name)} but {where} was trained with {value}; "
                              f"resume with the checkpoint's model, or start another run (checkpointing.run_name)")
    train, lines = config.training, []
    if point.consumed_samples == 0:  # nothing trained yet (step 0, e.g. tools/convert_from_hf.py): no batch to keep
        return lines
    run_batch = saved.training.micro_batch_size * saved.training.gradient_accumulation_steps * point.data_parallel_size
    if train.global_batch_size not in (0, run_batch):
        lines.append(f"global batch {run_batch} -> {train.global_batch_size} (training.global_batch_size set)")
        run_batch = train.global_batch_size
    per_step = train.micro_batch_size * dp_size
    if run_batch % per_step:
        fix = (f"set training.micro_batch_size to a divisor of {run_batch // dp_size}" if run_batch % dp_size == 0
               else f"use a DP size that divides {run_batch}")
        raise ConfigError(f"cannot keep the run's global batch of {run_batch} at DP={dp_size} with "
                          f"training.micro_batch_size={train.micro_batch_size} ({run_batch} is not a multiple of "
                          f"{per_step}); {fix}, or set training.global_batch_size to change it on purpose")
    accumulation = run_batch // per_step
    if accumulation != train.gradient_accumulation_steps:
        lines.append(f"keeping the run's global batch of {run_batch}: training.gradient_accumulation_steps "
                     f"{train.gradient_accumulation_steps} -> {accumulation} (micro batch {train.micro_batch_size} x "
                     f"DP {dp_size})")
        train.gradient_accumulation_steps = accumulation
    train.global_batch_size = run_batch
    changed = [f"training.{key} {getattr(saved.training, key)} -> {getattr(train, key)}" for key in SCHEDULE_KEYS
               if getattr(saved.training, key) != getattr(train, key)]
    if changed and not train.change_schedule_on_resume:
        raise ConfigError(f"{'; '.join(changed)} on resume would re-stretch the LR schedule from step {point.step} "
                          f"on; set training.change_schedule_on_resume=true to do it on purpose, or resume with "
                          f"the run's values")
    if changed:
        lines.append(f"changing the schedule on resume: {'; '.join(changed)}")
    return lines


def restore_rng(config: MegapicoConfig, point: ResumePoint) -> None:
    """Each rank takes back its own RNG state when the layout is unchanged (it has no twin otherwise)."""
    path = checkpoint_root(config) / point.tag / f"rng_rank{dist.get_rank()}.pt"
    if path.is_file() and dist.get_world_size() == point.tensor_parallel_size * point.data_parallel_size:
        _set_rng_state(read_checkpoint_file(path))
