"""Checkpoint -> verified HF directory, and a whole run -> pico's run directory (what pico-analyze reads).

Every export is written under a temporary name, loaded back with transformers and run on a fixed batch next
to megapico's own model rebuilt from the same weights; only a result within tolerance is renamed into place.
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from megapico.checkpoint.files import unexpected_global
from megapico.checkpoint.manifest import is_pruned
from megapico.checkpoint.paths import copy_tree, fresh_directory, inside, refuse_links
from megapico.checkpoint.training_state import STATE_FILE, step_of
from megapico.config import MegapicoConfig
from megapico.convert.checkpoint_reader import (
    PRUNED_EXPORT,
    CheckpointError,
    LoadedCheckpoint,
    checkpoint_config,
    load_checkpoint,
)
from megapico.convert.generate import reference_greedy
from megapico.convert.hf_export import MODELLING_FILE, TOKENIZER_FILES, write_llama, write_pico_hf
from megapico.model import PicoDecoder
from megapico.training.learning_dynamics import SUFFIXES

TOLERANCE = 1e-4


@contextmanager
def replacing_directory(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `output` to fill; it replaces `output` only if the block succeeds."""
    if output.is_symlink():
        raise CheckpointError(f"{output}: a symbolic link; refusing to replace what it points to (remove the link)")
    if output.exists() and not overwrite:
        raise CheckpointError(f"{output}: already exists (pass --overwrite to replace it)")
    with fresh_directory(output) as tmp:
        yield tmp
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)


@torch.no_grad()
def verification_gap(out_dir: Path, checkpoint: LoadedCheckpoint, fmt: str) -> float:
    """Max |logit difference| between the written model (loaded by transformers) and megapico's; then greedy
    generation, with and without the KV cache, must give megapico's own greedy tokens (up to near-ties)."""
    from transformers import AutoModelForCausalLM

    model_config = checkpoint.config.model
    reference = PicoDecoder(model_config)
    reference.load_state_dict(checkpoint.state_dict)
    exported = AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=fmt == "pico",
                                                    dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model_config.vocab_size, (2, min(64, model_config.max_seq_len)), generator=generator)
    gap = (exported(input_ids).logits.float() - reference(input_ids)).abs().max().item()
    if gap <= TOLERANCE:
        check_generation(exported, reference, input_ids[:, :min(8, model_config.max_seq_len // 2)], checkpoint, fmt)
    return gap


def check_generation(exported, reference: PicoDecoder, prompt: torch.Tensor, checkpoint: LoadedCheckpoint,  # noqa: ANN001
                     fmt: str) -> None:
    """Greedy generate, with and without the KV cache: at every step its logits equal megapico's for the same
    prefix (within TOLERANCE) and it picks the same token, unless the two best are a near-tie (then the
    sequences may part, and the comparison of that row ends)."""
    new_tokens = min(8, checkpoint.config.model.max_seq_len - prompt.shape[1])
    expected, step_logits = reference_greedy(reference, prompt, new_tokens)
    for use_cache in (True, False):
        out = exported.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=0,
                                return_dict_in_generate=True, output_logits=True)
        for row, (got, want) in enumerate(zip(out.sequences[:, prompt.shape[1]:].tolist(), expected, strict=True)):
            for step, (token, wanted) in enumerate(zip(got, want, strict=True)):
                gap = (out.logits[step][row].float() - step_logits[step][row]).abs().max().item()
                logits = step_logits[step][row]
                tie = (logits[wanted] - logits[token]).abs().item() <= 2 * TOLERANCE
                if gap > TOLERANCE or (token != wanted and not tie):
                    raise CheckpointError(f"{checkpoint.directory}: verification failed, the {fmt} export's greedy "
                                          f"generate (use_cache={use_cache}) gives {got} where megapico gives {want} "
                                          f"(step {step}: max |logit difference| {gap:.2e}); nothing written")
                if token != wanted:
                    break


def export_checkpoint(checkpoint: LoadedCheckpoint, output: Path, fmt: str = "pico", tokenizer: str | None = None,
                      overwrite: bool = False, verify: bool = True) -> float | None:
    """Write one checkpoint as an HF directory; returns the verification gap (None if not verified)."""
    tokenizer = tokenizer or checkpoint.config.data.tokenizer
    if not tokenizer:
        raise CheckpointError(f"{checkpoint.directory}: the run names no tokenizer (data.tokenizer); pass --tokenizer")
    with replacing_directory(output, overwrite) as tmp:
        if fmt == "pico":
            write_pico_hf(checkpoint.state_dict, checkpoint.config.model, tokenizer, tmp, checkpoint.global_batch_size)
        else:
            write_llama(checkpoint.state_dict, checkpoint.config.model, tokenizer, tmp)
        gap = verification_gap(tmp, checkpoint, fmt) if verify else None
        if gap is not None and not gap <= TOLERANCE:
            raise CheckpointError(f"{checkpoint.directory}: verification failed, max |logit difference| {gap:.3e} > "
                                  f"{TOLERANCE:g} between the {fmt} export and megapico's model; nothing written")
    return gap


def pico_training_config(config: MegapicoConfig, global_batch_size: int) -> dict:
    """training_config.yaml in pico-train's nested layout (pico-analyze reads model.* and checkpointing.*)."""
    train = config.training
    return {
        "checkpointing": {"run_name": config.checkpointing.run_name, "runs_dir": config.checkpointing.runs_dir,
                          "checkpoints_dir": "checkpoints", "learning_dynamics_dir": "learning_dynamics",
                          "save_every_n_steps": config.checkpointing.save_interval,
                          "learning_dynamics": {"batch_size": config.checkpointing.learning_dynamics.batch_size,
                                                "layer_suffixes": list(SUFFIXES), "sequence_idx": -1}},
        "data": {"dataset": {"name": " ".join(config.data.train_data_path)},
                 "dataloader": {"batch_size": global_batch_size},
                 "tokenizer": {"name": config.data.tokenizer, "vocab_size": config.model.vocab_size}},
        "model": {"model_type": "pico_decoder", **asdict(config.model)},
        "training": {"max_steps": train.max_steps,
                     "optimization": {"lr": train.lr, "lr_scheduler": train.lr_decay_style,
                                      "lr_warmup_steps": train.lr_warmup_steps, "optimizer": "adamw",
                                      "gradient_accumulation_steps": train.gradient_accumulation_steps}},
        "evaluation": {"metrics": [config.evaluation.name]},
        "monitoring": {"logging": {"log_every_n_steps": config.logging.log_interval},
                       "wandb": {"project": config.logging.wandb_project, "entity": config.logging.wandb_entity}},
    }


def copy_pruned_export(source: Path, target: Path) -> None:
    """The HF export a pruned checkpoint kept: its data files (never a link), and megapico's own modelling file
    instead of the copy the run directory holds (a received run's pico_decoder.py is someone else's code)."""
    refuse_links(source)
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    shutil.copyfile(MODELLING_FILE, target / "pico_decoder.py")


def copy_learning_dynamics(source: Path, target: Path) -> None:
    """pico's learning-dynamics files, passed on to pico-analyze (whose torch.load may not be weights-only): every
    pickle is scanned first, and one naming any global is refused."""
    for path in sorted(source.rglob("*.pt")):
        if refused := unexpected_global(path):
            raise CheckpointError(refused)
    copy_tree(source, target)


def step_directories(run_dir: Path, purpose: str) -> list[Path]:
    """The run's step_N directories with megapico_state.json written, by step; none is a CheckpointError saying
    what they were wanted for."""
    root = run_dir / "checkpoints"
    steps = [path for path in root.glob("step_*") if step_of(path.name) >= 0 and (path / STATE_FILE).is_file()]
    if not steps:
        raise CheckpointError(f"{root}: {purpose}")
    return sorted(steps, key=lambda path: step_of(path.name))


def convert_run(run_dir: Path, output_root: Path, tokenizer: str | None = None, overwrite: bool = False,
                verify: bool = True, progress=None) -> Path:  # noqa: ANN001
    """Every checkpoint of a run -> {output_root}/{run_name}/ in pico's layout; returns that directory. A checkpoint
    pruned by checkpointing.keep_last contributes the verified HF export it kept."""
    refuse_links(run_dir)  # a received run: nothing in it may point elsewhere
    steps = step_directories(run_dir, "no complete checkpoints to convert")
    config, global_batch = checkpoint_config(steps[0])
    output_root.mkdir(parents=True, exist_ok=True)
    target = inside(output_root, output_root / config.checkpointing.run_name)  # run_name is checked with the config
    with replacing_directory(target, overwrite) as tmp:
        (tmp / "checkpoints").mkdir(parents=True)
        for step_dir in (progress(steps) if progress else steps):
            out = tmp / "checkpoints" / step_dir.name
            if is_pruned(step_dir):
                copy_pruned_export(step_dir / PRUNED_EXPORT, out)
                note = f"the HF export kept when the checkpoint was pruned ({step_dir / PRUNED_EXPORT})"
            else:
                checkpoint = load_checkpoint(step_dir)
                gap = export_checkpoint(checkpoint, out, "pico", tokenizer, verify=verify)
                note = f"{checkpoint.source}; verified max |logit diff| {'skipped' if gap is None else f'{gap:.2e}'}"
            if (step_dir / "learning_dynamics").is_dir():
                copy_learning_dynamics(step_dir / "learning_dynamics", out / "learning_dynamics")
            print(f"{step_dir.name}: {note}", flush=True)
        (tmp / "checkpoints" / "latest").symlink_to(steps[-1].name)
        if (run_dir / "eval_results").is_dir():
            copy_tree(run_dir / "eval_results", tmp / "eval_results")
        (tmp / "training_config.yaml").write_text(yaml.safe_dump(pico_training_config(config, global_batch),
                                                                 sort_keys=False))
    return target
