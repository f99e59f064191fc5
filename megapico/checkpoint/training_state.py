"""Save and resume a training run: DeepSpeed's engine checkpoint plus megapico's own state.

Layout: runs/{run}/checkpoints/step_{N}/ holds DeepSpeed's files (mp_rank_XX_model_states.pt,
[bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt), megapico_state.json (step, consumed samples, layout, tokenizer),
config.yaml and rng_rank{R}.pt for every rank. `checkpoints/latest` (DeepSpeed's tag file) is replaced
atomically by rank 0 only after a barrier that every rank reaches once its files are written, so a run
killed during a save resumes from the previous complete checkpoint.
"""

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megapico.config import MegapicoConfig, save_config
from megapico.parallel import ParallelState, agree_across_ranks

STATE_FILE = "megapico_state.json"


@dataclass
class ResumePoint:
    step: int
    consumed_samples: int
    tag: str
    tensor_parallel_size: int
    data_parallel_size: int
    bf16: bool


def checkpoint_root(config: MegapicoConfig) -> Path:
    return Path(config.checkpointing.runs_dir) / config.checkpointing.run_name / "checkpoints"


def _rng_state() -> dict:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_checkpoint(engine, config: MegapicoConfig, parallel: ParallelState, step: int,  # noqa: ANN001
                             consumed_samples: int) -> Path:
    root = checkpoint_root(config)
    tag = f"step_{step}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    directory = root / tag
    torch.save(_rng_state(), directory / f"rng_rank{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        state = dict(step=step, consumed_samples=consumed_samples, tensor_parallel_size=parallel.tp_size,
                     data_parallel_size=parallel.dp_size, tokenizer=config.data.tokenizer,
                     bf16=bool(engine.bfloat16_enabled()))
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
        save_config(config, directory / "config.yaml")
    dist.barrier()  # every rank's files are on disk before `latest` may point at them
    if dist.get_rank() == 0:
        tmp = root / f"latest.tmp-{os.getpid()}"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
    dist.barrier()
    return directory


def find_resume_point(config: MegapicoConfig) -> ResumePoint | None:
    """The checkpoint `latest` names, per checkpointing.resume (auto / true / false)."""
    mode = config.checkpointing.resume
    root = checkpoint_root(config)
    latest = root / "latest"
    if mode == "false":
        return None
    if not latest.is_file():
        if mode == "true":
            raise FileNotFoundError(f"{latest}: no checkpoint to resume from (checkpointing.resume=true); "
                                    f"use resume=auto to start fresh when there is none")
        return None
    tag = latest.read_text().strip()
    state_path = root / tag / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path}: missing, checkpoint {root / tag} is incomplete; point "
                                f"{latest} at an earlier step_N")
    state = json.loads(state_path.read_text())
    return ResumePoint(state["step"], state["consumed_samples"], tag, state["tensor_parallel_size"],
                       state["data_parallel_size"], state["bf16"])


def agreed_resume_point(config: MegapicoConfig) -> ResumePoint | None:
    """find_resume_point on every rank, then one small all-gather: ranks that see different checkpoints (a
    node-local runs_dir, a `latest` that moved between reads) all stop with one error instead of one node
    resuming while the other starts fresh."""
    point = find_resume_point(config)
    agree_across_ranks(f"the checkpoint to resume from in {checkpoint_root(config)} (checkpointing.runs_dir must "
                       f"be on a filesystem that every node shares)", point.tag if point else "none")
    return point


def restore_rng(config: MegapicoConfig, point: ResumePoint) -> None:
    """Each rank takes back its own RNG state when the layout is unchanged (it has no twin otherwise)."""
    path = checkpoint_root(config) / point.tag / f"rng_rank{dist.get_rank()}.pt"
    if path.is_file() and dist.get_world_size() == point.tensor_parallel_size * point.data_parallel_size:
        _set_rng_state(torch.load(path, weights_only=False))
