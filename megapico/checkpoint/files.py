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
DeepSpeed's own `engine.load_checkpoint` reads through it too (use_data_only_loads), so resume is held to the same
rule. Tensors come back detached: DeepSpeed 0.16 saves its fp32 partitions with requires_grad=True.
"""

import functools
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from megapico.checkpoint.paths import CheckpointError


class InertNumpy:
    """What numpy's globals become when a pico-train one-device file is read. Lightning keeps its numpy RNG state
    there, which megapico never uses; the real constructors, called by a hostile pickle with its own bytes, build
    object arrays of raw pointers (a crash, or worse, when touched). This accepts and keeps nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


NUMPY_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                 "numpy.dtype", "numpy.dtypes.UInt32DType")


@functools.cache
def allowed_globals() -> dict[str, list]:
    """The globals each kind of checkpoint file may name (DeepSpeed is imported here, not with megapico.config)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {
        # Lightning Fabric's one-device save: the numpy RNG state inside _rng_states (numpy 1 and 2 names), read as
        # inert stand-ins
        "pico one-device": [(InertNumpy, name) for name in NUMPY_GLOBALS],
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


REFUSED = "refused, it asks to load the Python global"


def refusal(path: Path, name: str) -> str:
    """The one line for a file that names a global its kind never holds."""
    return (f"{path}: {REFUSED} {name}, which no {file_kind(path)} file needs (a checkpoint is read as data, never "
            f"as code); get the checkpoint from its author again")


def unexpected_global(path: str | Path) -> str | None:
    """The one-line refusal if the file's pickle names a global outside its kind's allowlist, found by reading the
    pickle's opcodes without running any of them. None when it names none, or when it is not a torch.save file at
    all (whoever opens it then reports it unreadable: read_checkpoint_file does)."""
    path = Path(path)
    with torch.serialization.safe_globals(allowed_globals()[file_kind(path)]):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip of torch.save
            return None
    return refusal(path, sorted(found)[0]) if found else None


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
    if refused := unexpected_global(path):  # named before any byte of the pickle runs
        raise CheckpointError(refused)
    try:
        with torch.serialization.safe_globals(allowed_globals()[file_kind(path)]):
            return _detached(torch.load(path, map_location=map_location, weights_only=True, mmap=False))
    except pickle.UnpicklingError as err:  # what the opcode scan cannot see (a global built on the stack)
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise CheckpointError(refusal(path, found[1]) if found else f"{path}: refused, not plain checkpoint data "
                              f"({str(err).splitlines()[0][:160]})") from None
    except Exception as err:  # truncated, or not a torch file at all
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


def use_data_only_loads(engine) -> None:  # noqa: ANN001
    """Make `engine.load_checkpoint` read every file through read_checkpoint_file: DeepSpeed's torch checkpoint
    engine loads with torch.load(weights_only=False); its load is replaced on this engine, saving is unchanged."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = engine.checkpoint_engine
    if type(checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed's checkpoint engine is {type(checkpoint_engine).__name__}; megapico reads "
                              f"checkpoints only through its torch engine (remove the checkpoint engine settings "
                              f"from the DeepSpeed JSON)")
    checkpoint_engine.load = lambda path, map_location=None: read_checkpoint_file(path, map_location or "cpu")
