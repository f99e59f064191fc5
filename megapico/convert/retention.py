"""checkpointing.keep_last: only the newest K checkpoints keep the full DeepSpeed state (what resuming needs); an
older one is replaced by what pico-analyze and the converter need from it.

For each checkpoint past the newest K full ones: its fp32 weights are exported as a pico HF directory `hf/` inside
it, through the converter (loaded back with transformers, logits and generation checked against megapico's model),
and a new manifest of kind "pruned" lists what stays (megapico_state.json, config.yaml, learning_dynamics/, hf/).
Only then are DeepSpeed's model, ZeRO and RNG files deleted. `tools/convert_to_hf.py --run-dir` takes the kept
export of a pruned step, so the pico run directory still has every step; eval results live in the run directory
and are never touched. A crash at any point leaves either the full checkpoint or the pruned one.
"""

from collections.abc import Callable
from pathlib import Path

from megapico.checkpoint.manifest import MANIFEST, directory_files, disk_bytes, read_manifest, write_manifest
from megapico.checkpoint.training_state import step_of
from megapico.config import MegapicoConfig
from megapico.convert.checkpoint_reader import PRUNED_EXPORT, load_checkpoint
from megapico.convert.convert import export_checkpoint

DEEPSPEED_FILES = ("mp_rank_", "zero_pp_rank_", "bf16_zero_pp_rank_", "rng_rank")


def prune_checkpoint(directory: Path) -> tuple[int, int]:
    """Replace a full checkpoint by its verified HF export + learning dynamics; (bytes before, bytes after)."""
    before = disk_bytes(directory)
    checkpoint = load_checkpoint(directory)  # verified against its manifest first
    export_checkpoint(checkpoint, directory / PRUNED_EXPORT, "pico", overwrite=True)
    keep = [name for name in directory_files(directory) if not Path(name).name.startswith(DEEPSPEED_FILES)]
    write_manifest(directory, checkpoint.config.parallel.tensor_parallel_size, kind="pruned", collective=False,
                   files=keep)
    for path in directory.iterdir():
        if path.is_file() and path.name.startswith(DEEPSPEED_FILES):
            path.unlink()
    return before, disk_bytes(directory)


def keep_last_checkpoints(root: Path, keep_last: int) -> list[str]:
    """Prune every full checkpoint under `root` except the newest `keep_last` (0: keep all); one process. Returns
    one line per checkpoint pruned."""
    if keep_last <= 0:
        return []
    # newest saved last, not highest step: after a resume from an earlier step (checkpointing.resume=step_N), the
    # run's new checkpoints are the ones to keep, and the old run's later steps the ones to prune
    full = sorted((path for path in root.glob("step_*") if (read_manifest(path) or {}).get("kind") == "full"),
                  key=lambda path: ((path / MANIFEST).stat().st_mtime_ns, step_of(path.name)))
    lines = []
    for directory in full[:-keep_last]:
        before, after = prune_checkpoint(directory)
        lines.append(f"checkpoint {directory.name} pruned (checkpointing.keep_last={keep_last}): {before / 2**20:,.1f} "
                     f"MiB -> {after / 2**20:,.1f} MiB (verified HF export + learning dynamics)")
    return lines


def retention_hook(config: MegapicoConfig) -> Callable[[Path], list[str]] | None:
    """What pretrain() calls on rank 0 after each checkpoint (None when checkpointing.keep_last is 0)."""
    keep_last = config.checkpointing.keep_last
    return (lambda root: keep_last_checkpoints(root, keep_last)) if keep_last > 0 else None
