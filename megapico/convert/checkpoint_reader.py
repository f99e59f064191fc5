"""Read a megapico training checkpoint (any TP x DP layout) into the full fp32 pico state dict.

Takes the fp32 master weights from the ZeRO optimizer partitions when they are there (exact), else the
module weights DeepSpeed saved per TP rank (bf16 in bf16 runs), and says which. Every shard the layout needs
must be present, come from the same step, and no shard of another TP size may be mixed in.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from megapico.checkpoint.files import CheckpointError, read_checkpoint_file
from megapico.checkpoint.manifest import is_pruned, verify_checkpoint
from megapico.checkpoint.paths import checkpoint_tag
from megapico.checkpoint.reshard import read_full_state
from megapico.checkpoint.training_state import STATE_FILE
from megapico.config import MegapicoConfig, load_config
from megapico.model import merge_tp_state_dicts


@dataclass
class LoadedCheckpoint:
    directory: Path
    step: int
    config: MegapicoConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    global_batch_size: int  # sequences per optimizer step in the run that saved it


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A step directory, a checkpoints/ root or its `latest` file -> the step directory."""
    path = Path(path)
    if path.name == "latest" and path.is_file():
        return path.parent / checkpoint_tag(path.read_text(), path)
    if (path / "latest").is_file() and not (path / STATE_FILE).is_file():
        return path / checkpoint_tag((path / "latest").read_text(), path / "latest")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (pass runs/RUN/checkpoints/step_N or .../latest)")
    return path


PRUNED_EXPORT = "hf"  # what checkpointing.keep_last leaves of an old checkpoint: its verified pico HF export


def checkpoint_config(directory: Path) -> tuple[MegapicoConfig, int]:
    """(the run's config, sequences per optimizer step) from a checkpoint's own files, full or pruned."""
    state = json.loads((directory / STATE_FILE).read_text())
    config = load_config(directory / "config.yaml", received=True)
    train = config.training
    return config, train.micro_batch_size * train.gradient_accumulation_steps * state["data_parallel_size"]


def load_checkpoint(path: str | Path, verify_hash: bool = True) -> LoadedCheckpoint:
    """The full fp32 state dict of a checkpoint, after checking it against its manifest (sizes, and sha256 unless
    verify_hash=False)."""
    directory = resolve_checkpoint_dir(path)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing; {directory} is not a complete megapico checkpoint")
    state = json.loads(state_path.read_text())
    if is_pruned(directory):
        raise CheckpointError(f"{directory}: pruned by checkpointing.keep_last; its weights are the verified HF export "
                              f"in {directory / PRUNED_EXPORT}")
    problem = verify_checkpoint(directory, state["tensor_parallel_size"], full_hash=verify_hash)
    if problem is not None:  # before any of DeepSpeed's pickles is opened
        raise CheckpointError(f"{directory} fails verification: {problem}")
    config, global_batch_size = checkpoint_config(directory)
    tp, dp, step = state["tensor_parallel_size"], state["data_parallel_size"], state["step"]
    model_files = sorted(directory.glob("mp_rank_*_model_states.pt"))
    foreign = [f.name for f in model_files if int(re.findall(r"\d+", f.name)[0]) >= tp]
    if foreign:
        raise CheckpointError(f"{directory / foreign[0]}: a shard of another TP size (this checkpoint was saved at "
                              f"TP={tp}); remove the stray files")
    module_shards = []
    for tp_rank in range(tp):
        path_tp = directory / f"mp_rank_{tp_rank:02d}_model_states.pt"
        if not path_tp.is_file():
            raise CheckpointError(f"{path_tp}: missing TP shard {tp_rank} of {tp}; the checkpoint is incomplete")
        saved = read_checkpoint_file(path_tp)
        if saved.get("global_steps") != step:
            raise CheckpointError(f"{path_tp}: from step {saved.get('global_steps')}, but the checkpoint is step "
                                  f"{step}; shards from different steps were mixed")
        module_shards.append({key: value.float() for key, value in saved["module"].items()})
    zero_files = list(directory.glob("*zero_pp_rank_*_optim_states.pt"))
    if zero_files:
        if len(zero_files) != tp * dp:
            raise CheckpointError(f"{directory}: {len(zero_files)} ZeRO shards, TP={tp} x DP={dp} needs {tp * dp}; "
                                  f"the checkpoint is incomplete")
        full = read_full_state(directory, tp, dp, state["bf16"])["weight"]
        source = f"fp32 master weights from {tp * dp} ZeRO partitions"
    else:
        full = merge_tp_state_dicts(module_shards)
        source = "module weights (bf16 in a bf16 run; no ZeRO partitions found)"
    return LoadedCheckpoint(directory, step, config, full, source, global_batch_size)
