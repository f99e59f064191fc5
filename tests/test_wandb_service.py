"""wandb's detached service ends with the run that started it: after an offline run no wandb-core it started is
left (wandb's default idle timeout kept one alive 10 minutes after every run), and the run's offline files are
complete (they end with wandb's exit record)."""

import struct

import psutil
from conftest import training_overrides as overrides
from distributed import train
from wandb.proto import wandb_internal_pb2


def wandb_records(path):
    """The record types in a .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB (from the file's start),
    each record a 7-byte header (checksum, length, kind: 1 whole, 2 first, 3 middle, 4 last) and its bytes."""
    data, position, pieces, kinds = path.read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            kinds.append(record.WhichOneof("record_type"))
            pieces = b""
    return kinds


def services_of(marker):
    """wandb-core processes whose command line holds `marker` (its --port-filename lies under the run's TMPDIR)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if any(marker in part for part in command) and "wandb-core" in " ".join(command):
            found.append(process.pid)
    return found


def test_the_run_stops_the_wandb_service_it_started(sample_prefix, tmp_path, monkeypatch, capfd):
    scratch = tmp_path / "tmp"  # the run's TMPDIR: `wandb beta core start` puts the service's port file there
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    train(1, overrides(sample_prefix, tmp_path, **{"logging.wandb_mode": "offline", "training.max_steps": 2}),
          tmp_path)
    out = capfd.readouterr().out
    assert "step 2/2" in out and "warning" not in out  # a detached service was started (no fall-back), and stopped
    assert services_of(str(scratch)) == []
    records = list((tmp_path / "runs" / "megapico-run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    kinds = wandb_records(records[0])
    assert kinds[0] == "header" and kinds[-1] == "exit" and kinds.count("history") == 2
