"""A manifest per checkpoint: every file's size and sha256, so a checkpoint is checked before anything opens it.

Written after every rank has finished writing and before `latest` moves: each rank hashes its share of the files
(the ZeRO partition and RNG file it wrote itself; the model states of its TP rank when it is DP rank 0; the rest on
rank 0), the lists are gathered, and rank 0 writes `manifest.json` atomically. A directory without one was never
finished. Verification splits the files over the ranks the same way; every rank learns every verdict, so all of
them take the same decision (resume, fall back, or stop with the same one-line error).

Verification opens only the files the manifest lists (each `.pt` one checked by the reader's scan: a torch.save zip
of stored records, naming no global its kind never holds). A file a manifest does not list is not opened here, and
resume's DeepSpeed load, which globs for model-state files, refuses it (files.use_data_only_loads asks `lists`).
"""

import hashlib
import json
import re
from pathlib import Path

import torch.distributed as dist

from megapico.checkpoint.files import unexpected_global
from megapico.checkpoint.paths import CheckpointError, relative_entry, write_text

MANIFEST = "manifest.json"
CHUNK = 8 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def owner_rank(name: str, tp_size: int, world_size: int) -> int:
    """The rank that wrote `name` (it has it in its page cache, and it is that rank's share of the hashing)."""
    if match := re.match(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$", name):
        rank = int(match[1]) * tp_size + int(match[2])
    elif match := re.match(r"mp_rank_(\d+)_model_states\.pt$", name):
        rank = int(match[1])
    elif match := re.match(r"rng_rank(\d+)\.pt$", name):
        rank = int(match[1])
    else:
        rank = 0
    return rank if rank < world_size else 0


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(entries: dict) -> dict:
    rank, world = _world()
    if world == 1:
        return entries
    parts: list[dict | None] = [None] * world
    dist.all_gather_object(parts, entries)
    return {key: value for part in parts for key, value in part.items()}


def directory_files(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*")
                  if path.is_file() and path.name != MANIFEST and ".tmp-" not in path.name)


def write_manifest(directory: Path, tp_size: int, kind: str = "full", collective: bool = True,
                   files: list[str] | None = None) -> dict:
    """Hash this rank's share of `files` (default: every file in `directory`), gather, and (rank 0) write
    manifest.json. Collective unless collective=False (one process hashes everything). kind: "full" (DeepSpeed
    state, resumable) or "pruned" (HF export + learning dynamics only)."""
    rank, world = _world() if collective else (0, 1)
    names = directory_files(directory) if files is None else files
    mine = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
            for name in names if owner_rank(Path(name).name, tp_size, world) == rank}
    manifest = {"kind": kind, "files": dict(sorted((_gather(mine) if collective else mine).items()))}
    if rank == 0:
        write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def lists(path: Path) -> bool:
    """Whether the manifest of the checkpoint directory holding `path` lists it: what DeepSpeed's load may read
    (megapico/checkpoint/files.py use_data_only_loads); a file beside the listed ones is never opened."""
    manifest = read_manifest(path.parent)
    return isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) and path.name in manifest["files"]


def is_pruned(directory: Path) -> bool:
    """Whether checkpointing.keep_last replaced this checkpoint's DeepSpeed state by its HF export."""
    manifest = read_manifest(directory)
    return manifest is not None and manifest.get("kind") == "pruned"


def disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def verify_checkpoint(directory: Path, tp_size: int, full_hash: bool = True) -> str | None:
    """None if every file of the manifest is there with its size (and sha256), and no pickle in it names a global
    its kind of file never holds; else a one-line reason naming the file. Collective when distributed: each rank
    checks its share, every rank gets the same answer."""
    manifest = read_manifest(directory)
    if manifest is None:
        return f"{directory / MANIFEST}: missing or unreadable (the save did not finish)"
    rank, world = _world()
    problems, root = {}, directory.resolve()
    for name, expected in manifest["files"].items():
        try:
            relative_entry(name, directory / MANIFEST)
        except CheckpointError as err:
            return str(err)  # every rank reads the same manifest and returns here alike
        if owner_rank(Path(name).name, tp_size, world) != rank:
            continue
        path = directory / name
        if path.is_symlink() or root not in path.resolve().parents:
            problems[name] = f"{path}: a symbolic link or a path leading out of the checkpoint; it holds plain files"
        elif not path.is_file():
            problems[name] = f"{path}: missing"
        elif path.stat().st_size != expected["bytes"]:
            problems[name] = f"{path}: {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
        elif full_hash and sha256_of(path) != expected["sha256"]:
            problems[name] = f"{path}: sha256 differs from the manifest (corrupted)"
        elif path.suffix == ".pt" and (refused := unexpected_global(path)):
            problems[name] = refused
    problems = _gather(problems)
    return problems[min(problems)] if problems else None
