"""Checkpoint -> verified HF directory, and a whole run -> pico's run directory (what pico-analyze reads).

Every export is written under a temporary name, loaded back with transformers and run on a fixed batch next
to megapico's own model rebuilt from the same weights; only a result within tolerance is renamed into place.
A run directory may be someone else's: nothing of it is copied as it stands. Weights, configs and tokenizer files
are generated from checked values, learning dynamics, eval results and analysis results are read, checked and
written anew (received.py), and the tokenizer is the user's --tokenizer or one inside the run
(received.export_tokenizer).
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from megapico.analysis.results import RESULTS_DIR
from megapico.checkpoint.manifest import is_pruned
from megapico.checkpoint.paths import fresh_directory, inside, refuse_links
from megapico.checkpoint.training_state import STATE_FILE, step_of
from megapico.config import MegapicoConfig, ModelConfig
from megapico.convert.checkpoint_reader import (
    PRUNED_EXPORT,
    CheckpointError,
    LoadedCheckpoint,
    checkpoint_config,
    load_checkpoint,
)
from megapico.convert.generate import reference_greedy
from megapico.convert.hf_export import write_llama, write_pico_hf
from megapico.convert.received import (
    checked_model_tensors,
    export_tokenizer,
    pico_hf_fields,
    pico_model_config,
    write_checked_analysis_results,
    write_checked_eval_results,
    write_checked_learning_dynamics,
)
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
                                eos_token_id=None,  # compared past end-of-text (the export's generation_config stops
                                # there, and min_new_tokens would forbid the token megapico picks)
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
    """Write one checkpoint as an HF directory; returns the verification gap (None if not verified). The tokenizer:
    `tokenizer` if given, else the one the run keeps (received.export_tokenizer)."""
    tokenizer = export_tokenizer(checkpoint.directory, checkpoint.config, tokenizer)
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


def copy_pruned_export(source: Path, target: Path, model: ModelConfig | None = None, batch_size: int | None = None,
                       tokenizer: str | Path | None = None) -> None:
    """The HF export a pruned checkpoint kept, written anew into `target`: its weights checked against `model` (the
    checkpoint's own config; default: pico's model keys of the export's config.json, read as data), config.json and
    generation_config.json generated, the tokenizer re-serialised (`tokenizer`, default the export's own) and
    megapico's modelling file. Nothing of the directory is copied as it stands."""
    refuse_links(source)
    if model is None:  # no megapico config beside it (a pico run directory): pico's keys of its config.json
        config_json = source / "config.json"
        model, batch_size = pico_model_config(config_json), pico_hf_fields(config_json)["batch_size"]
    tensors = checked_model_tensors(source / "model.safetensors", model)
    state_dict = {key.removeprefix("pico_decoder."): value for key, value in tensors.items()}
    write_pico_hf(state_dict, model, tokenizer or source / "tokenizer.json", target, batch_size)


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
    pruned by checkpointing.keep_last contributes the verified HF export it kept; eval_results/ and analysis_results/
    (every capture's, between checkpoints too) come along, checked and dumped again."""
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
                kept = step_dir / PRUNED_EXPORT
                step_config, step_batch = checkpoint_config(step_dir)
                own = kept / "tokenizer.json"  # what the export kept; else the run's (checked inside the run)
                ships = tokenizer or (own if own.is_file() else export_tokenizer(step_dir, step_config))
                copy_pruned_export(kept, out, step_config.model, step_batch, ships)
                note = f"the HF export kept when the checkpoint was pruned ({kept}), checked and written anew"
            else:
                checkpoint = load_checkpoint(step_dir)
                gap = export_checkpoint(checkpoint, out, "pico", tokenizer, verify=verify)
                note = f"{checkpoint.source}; verified max |logit diff| {'skipped' if gap is None else f'{gap:.2e}'}"
            if (step_dir / "learning_dynamics").is_dir():
                write_checked_learning_dynamics(step_dir / "learning_dynamics", out / "learning_dynamics",
                                                config.model)
            print(f"{step_dir.name}: {note}", flush=True)
        (tmp / "checkpoints" / "latest").symlink_to(steps[-1].name)
        if (run_dir / "eval_results").is_dir():
            write_checked_eval_results(run_dir / "eval_results", tmp / "eval_results")
        if (run_dir / RESULTS_DIR).is_dir():
            write_checked_analysis_results(run_dir / RESULTS_DIR, tmp / RESULTS_DIR)
        (tmp / "training_config.yaml").write_text(yaml.safe_dump(pico_training_config(config, global_batch),
                                                                 sort_keys=False))
    return target
