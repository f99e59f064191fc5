"""The one checkpoint reader against hostile files crafted here, each a few KB: nothing the process imported widens
what a file may name, a file that is not a torch.save zip is refused, memory stays about the file's size (shared
references, compressed or oversized records, views that repeat or overlap their storage), DeepSpeed's load reads only
files the manifest lists, and DeepSpeed settings that would load around the reader stop the launch."""

import json
import pickle
import struct
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import REPO

from megapico.checkpoint.files import file_kind, read_checkpoint_file, unexpected_global, use_data_only_loads
from megapico.checkpoint.manifest import verify_checkpoint, write_manifest
from megapico.checkpoint.paths import CheckpointError
from megapico.config import ConfigError, load_config
from megapico.training.deepspeed_config import build_deepspeed_config


class Reduce:
    """Pickles as a call of `function(*arguments)`: what a hostile file asks the unpickler to run."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def view(storage: torch.Tensor, offset: int, size: tuple, stride: tuple) -> Reduce:
    """A tensor record as torch.save writes one, with the view (offset, size, stride) of the sender's choosing."""
    return Reduce(torch._utils._rebuild_tensor_v2, storage._typed_storage(), offset, size, stride, False,
                  OrderedDict())


def refused(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        read_checkpoint_file(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_global_the_process_allowlisted_is_still_refused(tmp_path):
    """transformers and DeepSpeed add classes to torch's process-wide safe list; a file still names only its kind's."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Reduce(torch.nn.Linear, 2, 2)}, path)
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([torch.nn.Linear])
    try:
        assert "refused, it asks to load the Python global torch.nn.modules.linear.Linear" in unexpected_global(path)
        refused(path, "torch.nn.modules.linear.Linear, which no model states file needs")
        assert torch.nn.Linear in torch.serialization.get_safe_globals()  # the process's list is given back
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_a_file_that_is_not_a_torch_zip_is_refused_not_waved_through(tmp_path):
    plain = tmp_path / "train_activations.pt"
    plain.write_bytes(pickle.dumps({"layer": [1.0, 2.0]}))
    assert file_kind(plain) == "learning dynamics"
    assert "refused, not a torch.save file" in unexpected_global(plain)
    refused(plain, "refused, not a torch.save file")
    legacy = tmp_path / "val_weights.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    refused(legacy, "refused, not a torch.save file")
    # pico's learning dynamics are dicts of tensors: nothing of DeepSpeed's
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"w": torch.zeros(2), "stage": ZeroStageEnum(2)}, legacy)
    refused(legacy, "global deepspeed.runtime.zero.config.ZeroStageEnum, which no learning dynamics file needs")


def test_shared_references_are_walked_once_and_a_dag_that_unfolds_is_refused(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    dag = [torch.zeros(1)]
    for _ in range(20):  # 2**20 paths through 20 lists; 60 levels took the old reader hours
        dag = [dag, dag]
    torch.save({"module": dag}, path)
    assert path.stat().st_size < 4096
    refused(path, r"refused, its 2\d containers are shared so often that they unfold to \d+ \(a checkpoint is a tree")

    betas, weight = (0.9, 0.95), torch.ones(3)  # legitimate sharing: read once, still shared
    torch.save({"groups": [{"betas": betas}, {"betas": betas}], "a": weight, "b": weight}, path)
    loaded = read_checkpoint_file(path)
    assert loaded["a"] is loaded["b"] and loaded["groups"][0]["betas"] == (0.9, 0.95)

    loop = []
    loop.append(loop)
    torch.save({"module": loop}, path)
    refused(path, r"the container at module.0 holds itself")
    deep = [torch.zeros(1)]
    for _ in range(100):
        deep = [deep]
    torch.save({"module": deep}, path)
    refused(path, "containers nested deeper than 64")


def test_compressed_and_oversized_records_are_refused_before_loading(tmp_path):
    torch.save({"w": torch.zeros(1 << 20)}, tmp_path / "stored.pt")
    path = tmp_path / "mp_rank_00_model_states.pt"
    with zipfile.ZipFile(tmp_path / "stored.pt") as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            target.writestr(name, source.read(name), compress_type=zipfile.ZIP_DEFLATED if name.endswith(
                "/data/0") else zipfile.ZIP_STORED)
    assert path.stat().st_size < 16 << 10  # 4 MiB of tensor inflated from a few KB
    refused(path, r"its record \S+/data/0 is compressed")

    # a record whose directory entry claims more bytes than the file holds
    data = bytearray((tmp_path / "stored.pt").read_bytes())
    entry = data.rfind(b"PK\x01\x02", 0, data.find(b"/data/0", data.find(b"PK\x01\x02")) + 1)
    struct.pack_into("<II", data, entry + 20, 1 << 31, 1 << 31)  # compressed and uncompressed sizes
    path.write_bytes(bytes(data))
    refused(path, r"its records declare \d+ bytes in a \d+-byte file")


@pytest.mark.parametrize("size, stride, offset, message", [
    ((1 << 20, 1 << 20), (0, 0), 0, r"tensor module.w repeats one element 1048576 times \(stride 0"),
    ((1 << 30,), (1,), 0, "a tensor view reaches past its storage record"),
    ((4,), (1,), 2, "a tensor view reaches past its storage record"),
    ((4,), (-1,), 3, "a tensor view reaches past its storage record"),
    ((1000, 1000), (1, 1), 0, r"its tensors view 4000000 bytes of 8000 bytes of storage \(overlapping views"),
])
def test_views_past_or_repeating_their_storage_are_refused(tmp_path, size, stride, offset, message):
    """An 11 KB ZeRO partition with a stride-0 view made convert_to_hf allocate 4 TiB: views are checked on load."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    storage = torch.zeros(2000 if stride == (1, 1) else 4)
    torch.save({"module": {"w": view(storage, offset, size, stride)}}, path)
    refused(path, message)


def test_many_overlapping_views_of_one_storage_are_refused(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    storage = torch.zeros(1024)
    torch.save({"module": {f"w{i}": view(storage, i, (1000,), (1,)) for i in range(24)}}, path)
    refused(path, "its tensors view 96000 bytes of 4096 bytes of storage")


def test_deepspeeds_load_reads_only_what_the_manifest_lists(tmp_path):
    """DeepSpeed globs mp_rank_*_model_states.pt: a file planted beside a verified checkpoint is refused, not read."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    use_data_only_loads(engine)
    torch.save({"module": {"w": torch.ones(2)}}, tmp_path / "mp_rank_00_model_states.pt")
    write_manifest(tmp_path, 1, collective=False)
    torch.save({"module": {"w": torch.zeros(2)}}, tmp_path / "mp_rank_01_model_states.pt")
    assert verify_checkpoint(tmp_path, 1) is None  # the manifest's files verify; the planted one is not among them
    loaded = engine.checkpoint_engine.load(str(tmp_path / "mp_rank_00_model_states.pt"))
    assert torch.equal(loaded["module"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match=r"mp_rank_01_model_states.pt: not listed in .*manifest.json, so never "
                                              r"read"):
        engine.checkpoint_engine.load(str(tmp_path / "mp_rank_01_model_states.pt"))


@pytest.mark.parametrize("extra, setting", [
    ({"checkpoint": {"load_universal": True}}, "remove checkpoint.load_universal: DeepSpeed's universal-checkpoint"),
    ({"checkpoint": {"writer": {"type": "fast"}}}, "remove checkpoint.writer: it replaces DeepSpeed's torch"),
    ({"datastates_ckpt": {"host_cache_size": 1}}, "remove datastates_ckpt: it replaces"),
    ({"nebula": {"enabled": True}}, "remove nebula: it replaces"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}},
     "zero_optimization.offload_optimizer.device=nvme: resuming would copy"),
])
def test_deepspeed_settings_that_load_around_the_reader_stop_the_launch(tmp_path, extra, setting):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**json.loads((REPO / "ds_configs" / "zero2_cpu.json").read_text()), **extra}))
    config = load_config(None, ["training.precision=fp32", f"training.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=setting) as info:
        build_deepspeed_config(config, dp_size=1)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    path.write_text(json.dumps({**json.loads((REPO / "ds_configs" / "zero2_cpu.json").read_text()),
                                "checkpoint": {"load_universal": False}}))
    build_deepspeed_config(config, dp_size=1)  # stating the default is fine


def test_plain_data_of_any_width_reads_and_sets_are_checked_too(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"losses": [float(i) for i in range(5000)], "names": {f"w{i}" for i in range(3000)}}, path)
    assert len(read_checkpoint_file(path)["losses"]) == 5000
    torch.save({"frozen": {view(torch.zeros(4), 0, (1 << 20,), (0,))}}, path)
    refused(path, "repeats one element 1048576 times")
    torch.save({"module": {view(torch.zeros(4), 0, (4,), (1,)): 1}}, path)
    refused(path, "a dict at module is keyed by tensors")
