"""Every checkpoint file megapico opens is read here, and read as data: never as code, and never into much more memory
than the file itself holds.

A `.pt` file is a pickle inside a zip, and a pickle can name any Python callable to run while it loads. Checkpoints
travel (pico-lm's runs on the Hub, runs shared between labs), and a manifest proves nothing against a sender who
rewrites it, so a file is opened once (checked and loaded from the same open file) and checked in this order;
nothing of it is returned unless every step passes:

1. the archive is what torch.save writes: a zip whose records sit in one folder beside its `data.pkl`, every record
   stored uncompressed (a 2 MB DEFLATE record would inflate to 2 GiB), and the records together no larger than the
   file (so no record is read twice and none claims bytes the file lacks). A plain pickle, or any other file, is
   refused: it is not "clean" for want of a zip to scan.
2. the pickle's opcodes are read without running any of them, and every global it names must be one torch.save
   writes for tensors and plain containers (DATA_GLOBALS: the tensor rebuild function, typed storages, OrderedDict,
   torch.Size, set, bytes) or one of the few its kind of file legitimately holds (measured on the files pico-train and
   DeepSpeed 0.16.2 to 0.19.8 write):

   - pico-train's one-device `fabric_state/checkpoint.pt`: numpy's array reconstruction (Lightning keeps the numpy
     RNG state as an array), read as inert stand-ins;
   - DeepSpeed's ZeRO partition files: its `LossScaler`, `ZeroStageEnum` and `fragment_address`;
   - DeepSpeed's model-state files, megapico's `rng_rank*.pt` and pico's learning-dynamics files
     (`{train,val}_{activations,weights,gradients}.pt`): nothing else.

   torch's weights-only unpickler would also build tensors of any class, sparse, nested and meta tensors, or call
   `bytearray(n)` and storage constructors with a size of the sender's choosing; none of those globals is in a
   checkpoint, so they are refused here.
3. the pickle is unpickled by torch's weights-only unpickler with exactly that kind's list: torch keeps one
   process-wide list of extra safe globals (transformers and DeepSpeed add DTensor, DeviceMesh and more to it on
   import), which is emptied for the read and restored after it, so no import widens what a file may name.
4. what came out is walked once, shared references by identity (and returned still shared): containers nested at
   most MAX_DEPTH deep, none holding itself, and the tree they unfold to (what any later walk visits) at most twice
   the distinct containers plus SHARING_SLACK (a 2 KB DAG of 60 shared lists unfolds to 2**60); every tensor a plain
   view inside its storage (no negative stride, no stride-0 repetition of one element along a dimension of size > 1,
   nothing past the storage's end), and the distinct views together no larger than the storages they view (so
   copying every tensor costs at most the records' bytes). Tensors come back detached: DeepSpeed 0.16 saves its fp32
   partitions with requires_grad=True.

Where allocation happens (torch 2.13's serialization.py): each storage is its zip record, read whole (torch checks
the record's size against the size the pickle declares, once per record); a tensor is a view built by set_ on that
storage, which cannot be resized, so torch itself refuses a view past its record or with a negative stride while
loading (reported as "a tensor view reaches past its storage record", without the tensor's name, which torch does
not give); a stride-0 or overlapping view it builds without allocating, and step 4 refuses it by name. So a read
allocates about the file's size. A file that fails
any check is refused with one line naming the file and what it holds; nothing of it runs. DeepSpeed's own
`engine.load_checkpoint` reads through it too (use_data_only_loads), and only files its checkpoint's manifest lists.
"""

import functools
import io
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch._weights_only_unpickler import get_globals_in_pkl

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
# what torch.save writes for tensors (rebuild + typed storage names), their backward-hook OrderedDicts, DeepSpeed's
# param_shapes (torch.Size) and frozen-parameter sets, and bytes
DATA_GLOBALS = frozenset({"torch._utils._rebuild_tensor_v2", "collections.OrderedDict", "torch.Size", "builtins.set",
                          "_codecs.encode",
                          *(f"torch.{name}" for name in torch.storage._dtype_to_storage_type_map().values())})
MAX_DEPTH = 64  # containers within containers; DeepSpeed's deepest state is a few levels
SHARING_SLACK = 1024  # nodes a tree may unfold to beyond twice the distinct ones (shared tuples such as AdamW's betas)


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
        "learning dynamics": [],  # pico's dicts of tensors, passed on to pico-analyze
    }


def _global_name(entry: Any) -> str:  # noqa: ANN401
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


def file_kind(path: Path) -> str:
    """Which allowlist a checkpoint file is read with, from its name."""
    if re.fullmatch(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt", path.name):
        return "zero partition"
    if re.fullmatch(r"rng_rank\d+\.pt", path.name):
        return "rng"
    if re.fullmatch(r"(train|val)_(activations|weights|gradients)\.pt", path.name):
        return "learning dynamics"
    if path.name == "checkpoint.pt":
        return "pico one-device"
    return "model states"


REFUSED = "refused, it asks to load the Python global"
AGAIN = "get the checkpoint from its author again"


def refusal(path: Path, name: str) -> str:
    """The one line for a file that names a global its kind never holds."""
    return (f"{path}: {REFUSED} {name}, which no {file_kind(path)} file needs (a checkpoint is read as data, never "
            f"as code); {AGAIN}")


def _archive_refusal(handle: BinaryIO, path: Path) -> str | None:
    """Steps 1 and 2 of the module docstring on an open file: the one-line refusal, or None."""
    size = os.fstat(handle.fileno()).st_size
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return f"{path}: refused, not a torch.save file (a zip of tensor records); a checkpoint holds nothing else"
    with archive:  # closes the archive, not the handle it was given
        records = archive.infolist()
        folder = records[0].filename.split("/")[0] if records else ""
        pickles = [record for record in records if record.filename == f"{folder}/data.pkl"]
        if len(pickles) != 1 or any(not record.filename.startswith(f"{folder}/") for record in records):
            return f"{path}: refused, not a torch.save file (its zip holds no single data.pkl beside its records)"
        for record in records:
            if record.compress_type != zipfile.ZIP_STORED or record.flag_bits & 1 or \
                    record.compress_size != record.file_size:
                return (f"{path}: refused, its record {record.filename} is compressed (torch.save stores records as "
                        f"they are; a compressed one can inflate far beyond the file); {AGAIN}")
        if (declared := sum(record.file_size for record in records)) > size:
            return (f"{path}: refused, its records declare {declared} bytes in a {size}-byte file (records that "
                    f"overlap or claim bytes the file lacks); {AGAIN}")
        try:  # torch's own opcode reader (torch.serialization.get_unsafe_globals_in_checkpoint uses it)
            names = get_globals_in_pkl(io.BytesIO(archive.read(pickles[0])))
        except Exception as err:  # an opcode the weights-only unpickler refuses too, or a truncated pickle
            return f"{path}: refused, not plain checkpoint data ({type(err).__name__}: {str(err)[:120]})"
    allowed = DATA_GLOBALS | {_global_name(entry) for entry in allowed_globals()[file_kind(path)]}
    return refusal(path, min(names - allowed)) if names - allowed else None


def unexpected_global(path: str | Path) -> str | None:
    """The one-line refusal if the file is not a torch.save archive of stored records no larger than the file, or
    its pickle names a global outside DATA_GLOBALS and its kind's list, found by reading the pickle's opcodes
    without running any of them; None when it is neither."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _archive_refusal(handle, path)
    except OSError as err:
        return f"{path}: unreadable ({type(err).__name__}: {err.strerror})"


@contextmanager
def exactly_these_globals(allowed: list) -> Iterator[None]:
    """torch's process-wide safe-globals list holding exactly `allowed` for the duration, whatever was imported."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def _view_problem(tensor: torch.Tensor) -> str | None:
    """Why a loaded tensor is not a plain view inside its storage, or None."""
    if any(stride < 0 for stride in tensor.stride()):
        return f"has a negative stride {tuple(tensor.stride())}"
    if tensor.numel() == 0:
        return None
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        if stride == 0 and size > 1:
            return f"repeats one element {size} times (stride 0, shape {tuple(tensor.shape)})"
    elements = tensor.untyped_storage().nbytes() // tensor.element_size()
    last = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(),
                                                                                      strict=True))
    if last >= elements:
        return f"reaches element {last} of a {elements}-element storage"
    return None


def _detached_checked(value: Any, path: Path) -> Any:  # noqa: ANN401
    """Step 4 of the module docstring: the value with tensors detached, each shared object walked once."""
    copies: dict[int, Any] = {}
    unfolded: dict[int, int] = {}  # containers and tensors in each container's subtree, repeats counted
    open_containers: set[int] = set()
    views: set[tuple] = set()
    storages: dict[tuple, int] = {}

    def walk(item: Any, where: tuple, depth: int) -> Any:  # noqa: ANN401
        key = id(item)
        if key in open_containers:
            raise CheckpointError(f"{path}: refused, the container at {_where(where)} holds itself; {AGAIN}")
        if key in copies:
            return copies[key]
        if isinstance(item, torch.Tensor):
            if problem := _view_problem(item):
                raise CheckpointError(f"{path}: refused, tensor {_where(where)} {problem} (a checkpoint holds plain "
                                      f"tensors inside their storage); {AGAIN}")
            storage = item.untyped_storage()
            storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
            views.add((str(storage.device), storage.data_ptr(), item.storage_offset(), tuple(item.shape),
                       item.stride(), item.dtype, item.numel() * item.element_size()))
            copies[key], unfolded[key] = item.detach(), 1
            return copies[key]
        if not isinstance(item, dict) and type(item) not in (list, tuple, set):
            return item
        if depth >= MAX_DEPTH:
            raise CheckpointError(f"{path}: refused, containers nested deeper than {MAX_DEPTH} at {_where(where)} "
                                  f"(a checkpoint's state is a few levels deep); {AGAIN}")
        if isinstance(item, dict) and any(isinstance(name, torch.Tensor) for name in item):
            raise CheckpointError(f"{path}: refused, a dict at {_where(where)} is keyed by tensors (a checkpoint's "
                                  f"keys are names and numbers); {AGAIN}")
        open_containers.add(key)
        items = item.items() if isinstance(item, dict) else enumerate(item)
        copied = {name: walk(entry, (*where, name), depth + 1) for name, entry in items}
        open_containers.discard(key)
        unfolded[key] = 1 + sum(unfolded.get(id(entry), 0) for entry in
                                (item.values() if isinstance(item, dict) else item))
        copies[key] = copied if isinstance(item, dict) else type(item)(copied.values())
        return copies[key]

    result = walk(value, (), 0)
    if unfolded.get(id(value), 1) > 2 * len(copies) + SHARING_SLACK:
        raise CheckpointError(f"{path}: refused, its {len(copies)} containers are shared so often that they unfold "
                              f"to {unfolded[id(value)]} (a checkpoint is a tree); {AGAIN}")
    viewed, stored = sum(view[-1] for view in views), sum(storages.values())
    if viewed > stored:
        raise CheckpointError(f"{path}: refused, its tensors view {viewed} bytes of {stored} bytes of storage "
                              f"(overlapping views; a checkpoint's tensors are distinct data); {AGAIN}")
    return result


def _where(where: tuple) -> str:
    return ".".join(str(part)[:40] for part in where) or "(the top level)"


def read_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> Any:  # noqa: ANN401
    """The contents of one checkpoint file, checked and unpickled as data as the module docstring says; a
    CheckpointError with one line naming the file otherwise (missing, truncated, compressed, not a torch.save zip,
    needing a global no checkpoint of its kind holds, or holding views or references that would multiply memory)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file (was the save interrupted, or a file lost?)")
    with open(path, "rb") as handle:  # checked and loaded from one open file: a swap between the two changes nothing
        if refused := _archive_refusal(handle, path):  # named before any byte of the pickle runs
            raise CheckpointError(refused)
        handle.seek(0)
        try:
            with exactly_these_globals(allowed_globals()[file_kind(path)]):
                loaded = torch.load(handle, map_location=map_location, weights_only=True, mmap=False)
        except pickle.UnpicklingError as err:  # the scan above names every global; kept for a torch that differs
            found = re.search(r"GLOBAL (\S+)", str(err))
            raise CheckpointError(refusal(path, found[1]) if found else f"{path}: refused, not plain checkpoint data "
                                  f"({str(err).splitlines()[0][:160]})") from None
        except Exception as err:  # truncated; or a view torch would not build on its record
            message = str(err).splitlines()[0] if str(err) else ""
            if "not resizable" in message or "size calculation overflowed" in message:
                raise CheckpointError(f"{path}: refused, a tensor view reaches past its storage record ({message[:120]}"
                                      f"); {AGAIN}") from None
            raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {message[:120]})") from None
    return _detached_checked(loaded, path)


def use_data_only_loads(engine) -> None:  # noqa: ANN001
    """Make `engine.load_checkpoint` read every file through read_checkpoint_file, and only files its checkpoint's
    manifest lists (DeepSpeed globs `mp_rank_*_model_states.pt` and tries old partition names, so a file planted
    beside a verified checkpoint would be read): DeepSpeed's torch checkpoint engine loads with
    torch.load(weights_only=False); its load is replaced on this engine, saving is unchanged."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from megapico.checkpoint.manifest import MANIFEST, lists

    checkpoint_engine = engine.checkpoint_engine
    if type(checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed's checkpoint engine is {type(checkpoint_engine).__name__}; megapico reads "
                              f"checkpoints only through its torch engine (remove the checkpoint engine settings "
                              f"from the DeepSpeed JSON)")

    def load(path: str, map_location: Any = None) -> Any:  # noqa: ANN401
        if not lists(Path(path)):
            raise CheckpointError(f"{path}: not listed in {Path(path).parent / MANIFEST}, so never read (DeepSpeed "
                                  f"asked for a file the verified checkpoint does not hold: planted, or left from "
                                  f"another save); move it away")
        return read_checkpoint_file(path, map_location or "cpu")

    checkpoint_engine.load = load
