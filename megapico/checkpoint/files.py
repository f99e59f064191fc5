"""Every checkpoint file megapico opens is read here, and read as data: never as code.

A `.pt` file is a pickle, and a pickle can name any Python callable to run while it loads. Checkpoints travel
(pico-lm's runs on the Hub, runs shared between labs), and a manifest proves nothing against a sender who rewrites
it, so every read uses torch's weights-only unpickler with an allowlist of exactly the globals that legitimate
files of that kind hold (measured on the files pico-train and DeepSpeed 0.16.2 to 0.19.8 write):

- pico-train's one-device `fabric_state/checkpoint.pt`: numpy's array reconstruction (Lightning keeps the numpy
  RNG state as an array);
- DeepSpeed's ZeRO partition files: its `LossScaler`, `ZeroStageEnum` and `fragment_address`;
- DeepSpeed's model-state files and megapico's `rng_rank*.pt`: nothing beyond tensors, numbers and strings.

A file that needs anything else is refused with one line naming the file and the global; nothing of it runs.
DeepSpeed's own `engine.load_checkpoint` reads through `DataOnlyCheckpointEngine`, so resume is held to the same
rule. Tensors come back detached: DeepSpeed 0.16 saves its fp32 partitions with requires_grad=True.
"""

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, converted or resumed; one line naming the file and the fix."""


_NUMPY_RECONSTRUCT = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
ALLOWED_GLOBALS: dict[str, list] = {
    # Lightning Fabric's one-device save: the numpy RNG state inside _rng_states (numpy 2 names; numpy 1 files name
    # the same function numpy.core.multiarray._reconstruct)
    "pico one-device": [_NUMPY_RECONSTRUCT, (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"), np.ndarray,
                        np.dtype, type(np.dtype(np.uint32))],
    "zero partition": [LossScaler, ZeroStageEnum, fragment_address],
    "model states": [],
    "rng": [],
}


def file_kind(path: Path) -> str:
    """Which allowlist a checkpoint file is read with, from its name."""
    if re.fullmatch(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt", path.name):
        return "zero partition"
    if re.fullmatch(r"rng_rank\d+\.pt", path.name):
        return "rng"
    if path.name == "checkpoint.pt":
        return "pico one-device"
    return "model states"


def _detached(value: Any) -> Any:  # noqa: ANN401
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_detached(item) for item in value)
    return value


def read_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> Any:  # noqa: ANN401
    """The contents of one checkpoint file, unpickled as data with its kind's allowlist; a CheckpointError naming
    the file otherwise (missing, truncated, or needing a global no checkpoint of its kind holds)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file (was the save interrupted, or a file lost?)")
    kind = file_kind(path)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS[kind]):
            return _detached(torch.load(path, map_location=map_location, weights_only=True, mmap=False))
    except pickle.UnpicklingError as err:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(err)):
            raise CheckpointError(f"{path}: refused, it asks to load the Python global {found[1]}, which no "
                                  f"{kind} file needs (a checkpoint is read as data, never as code); get the "
                                  f"checkpoint from its author again") from None
        raise CheckpointError(f"{path}: refused, not plain checkpoint data "
                              f"({str(err).splitlines()[0][:160]})") from None
    except Exception as err:  # truncated, or not a torch file at all
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


class DataOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with its load (torch.load with weights_only=False) replaced by
    read_checkpoint_file; saving is unchanged."""

    def load(self, path: str, map_location: Any = None) -> Any:  # noqa: ANN401
        return read_checkpoint_file(path, map_location if map_location is not None else "cpu")


def use_data_only_loads(engine) -> None:  # noqa: ANN001
    """Make `engine.load_checkpoint` read every file through read_checkpoint_file."""
    if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
        raise CheckpointError(f"DeepSpeed's checkpoint engine is {type(engine.checkpoint_engine).__name__}; megapico "
                              f"reads checkpoints only through the torch engine (remove checkpoint.* engine settings "
                              f"from the DeepSpeed JSON)")
    safe = DataOnlyCheckpointEngine.__new__(DataOnlyCheckpointEngine)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)
    engine.checkpoint_engine = safe
