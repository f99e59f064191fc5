"""YAML + dotted overrides -> a validated MegapicoConfig, or one ConfigError naming the key and the fix.

Order of precedence: schema defaults < model_preset < YAML file < command-line `a.b=value` overrides.
Unknown keys and wrong types are errors (never silently dropped); cross-field facts are checked once here.
"""

import difflib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megapico.config.presets import MODEL_PRESETS
from megapico.config.schema import MegapicoConfig, ModelConfig, ParallelConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the key and the fix."""


CHOICES: dict[str, tuple[str, ...]] = {
    "training.lr_decay_style": ("linear", "cosine"),
    "training.precision": ("auto", "bf16-mixed", "bf16", "lightning-deepspeed-bf16", "fp32"),
    "data.samples": ("megatron", "pretokenized"),
    "evaluation.perplexity": ("tokens", "pico"),
    "training.nan_policy": ("stop", "skip"),
    "training.activation_checkpointing.mode": ("none", "full", "selective"),
    "checkpointing.verify": ("hash", "size"),
    "checkpointing.learning_dynamics.precision": ("auto", "fp32", "bf16-mixed", "bf16"),
    "checkpointing.learning_dynamics.analysis_device": ("auto", "cpu", "cuda"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "checkpointing.hf_checkpoint.training_state": ("every", "last", "never"),
}


def _spelling_hint(key: str) -> str:
    """"did you mean 'training.lr'?" for a misspelled 'training.lrr': the closest of the schema's keys at that
    level (difflib), or where to look when none is close."""
    parent, _, name = key.rpartition(".")
    level = OmegaConf.select(OmegaConf.structured(MegapicoConfig), parent) if parent else OmegaConf.structured(
        MegapicoConfig)
    keys = [str(k) for k in level.keys()] if isinstance(level, DictConfig) else []
    close = difflib.get_close_matches(name, keys, n=1)
    if close:
        return f"did you mean '{f'{parent}.' if parent else ''}{close[0]}'?"
    return "check the spelling against megapico/config/schema.py"


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        msg = str(err).splitlines()[0]
        if "not in" in msg or "Key '" in msg:
            raise ConfigError(f"{source}: unknown config key '{key}' ({_spelling_hint(key)})") from None
        raise ConfigError(f"{source}: bad value for '{key}': {msg}") from None


def _interpolation(value: object, key: str = "") -> str | None:
    """The dotted key of the first `${...}` value (escaped or not) in a plain container, or None."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return key if isinstance(value, str) and "${" in value else None
    for name, item in items:
        if found := _interpolation(item, f"{key}.{name}" if key else str(name)):
            return found
    return None


def _as_list_if_listed(item: str) -> str:
    """`data.train_data_path=../x` for a list key means the one-element list [../x] (Megatron's --data-path takes
    bare paths); a value already in brackets is left as it is."""
    key, value = item.split("=", 1)
    try:
        listed = OmegaConf.is_list(OmegaConf.select(OmegaConf.structured(MegapicoConfig), key.strip()))
    except OmegaConfBaseException:
        return item
    return f"{key}=[{value}]" if listed and not value.strip().startswith("[") else item


def _interpolation_message(source: str, key: str) -> str:
    return (f"{source}: '{key}' is an interpolation (${{...}}); megapico reads configs as plain values, never "
            f"resolved from the environment or other keys: write the value itself")


def _refuse_interpolation(values: DictConfig, source: str) -> None:
    """OmegaConf resolves `${...}` when the tree is built: `${oc.env:HF_TOKEN}` would copy a secret from the
    environment into the saved config.yaml, every checkpoint and the Hub, and `${other.key}` or a resolver makes a
    value something its file does not say. A config is plain values, so any interpolation is refused, before
    anything reads a value (even an error message quoting a resolved value would leak it)."""
    if key := _interpolation(OmegaConf.to_container(values, resolve=False)):
        raise ConfigError(_interpolation_message(source, key))


REPLACED: dict[str, str] = {
    "evaluation.max_batches": "evaluation.max_sequences (sequences per evaluation for the whole run, split over the "
                              "DP ranks; 0 = the whole eval set): max_batches counted micro batches per DP rank",
}


def _replaced_keys(values: DictConfig, source: str, received: bool) -> None:
    """A key an earlier megapico had: named by the user, one line giving its replacement; in a config saved by that
    release (received), dropped."""
    for old, new in REPLACED.items():
        parent, _, name = old.rpartition(".")
        section = OmegaConf.select(values, parent)
        if isinstance(section, DictConfig) and name in section:
            if not received:
                raise ConfigError(f"{source}: '{old}' was replaced by {new}")
            del section[name]


def load_config(yaml_path: str | Path | None = None, overrides: Sequence[str] = (),
                received: bool = False) -> MegapicoConfig:
    """Build the run's config from an optional YAML file and `section.key=value` overrides. Every YAML and override
    is read as plain values: a `${...}` interpolation anywhere is refused (_refuse_interpolation). received=True:
    the YAML was saved with a checkpoint or run directory, so a key an earlier release had is dropped (REPLACED)
    instead of refused, and the run still resumes, converts and plots."""
    merged = OmegaConf.structured(MegapicoConfig)
    yaml_cfg = OmegaConf.create()
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (pass an existing YAML with --config)")
        try:
            yaml_cfg = OmegaConf.load(path)
        except Exception as err:  # yaml.YAMLError and friends: report the file, not a traceback
            raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(yaml_cfg, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping of sections (model:, training:, ...)")
        _refuse_interpolation(yaml_cfg, str(path))
        _replaced_keys(yaml_cfg, str(path), received)
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"command line: override '{bad[0]}' is not of the form section.key=value")
    cli_cfg = OmegaConf.create()
    for item in overrides:
        key, value = item.split("=", 1)
        if "${" in value:  # before YAML parses it (`[${...}]` is not even valid YAML)
            raise ConfigError(_interpolation_message("command line", key.strip()))
        try:
            cli_cfg.merge_with_dotlist([_as_list_if_listed(item)])
        except Exception as err:  # a value YAML cannot parse (an unclosed bracket): one line, not yaml's traceback
            raise ConfigError(f"command line: override '{item}' is not a valid value: {str(err).splitlines()[0]} "
                              f"(write a list as [a,b])") from None
    _refuse_interpolation(cli_cfg, "command line")
    _replaced_keys(cli_cfg, "command line", received=False)

    preset = OmegaConf.select(cli_cfg, "model_preset") or OmegaConf.select(yaml_cfg, "model_preset")
    if preset:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"model_preset '{preset}' is unknown; choose one of {sorted(MODEL_PRESETS)}")
        merged.model = OmegaConf.structured(MODEL_PRESETS[preset])
    merged = _merge(merged, yaml_cfg, str(yaml_path))
    merged = _merge(merged, cli_cfg, "command line")
    config: MegapicoConfig = OmegaConf.to_object(merged)
    if config.checkpointing.resume in ("True", "False"):  # YAML / dotlist `resume=false` arrives as a bool
        config.checkpointing.resume = config.checkpointing.resume.lower()
    validate_config(config)
    return config


def validate_model(model: ModelConfig, parallel: ParallelConfig | None = None) -> None:
    """Shape facts the model needs: divisibility of heads, hidden sizes and vocab by the TP size."""
    positive = ("d_model", "n_layers", "attention_n_heads", "attention_n_kv_heads", "activation_hidden_dim",
                "vocab_size", "max_seq_len")
    for name in positive:
        if getattr(model, name) <= 0:
            raise ConfigError(f"model.{name} must be positive, got {getattr(model, name)}")
    if model.d_model % model.attention_n_heads:
        raise ConfigError(f"model.d_model={model.d_model} is not divisible by "
                          f"model.attention_n_heads={model.attention_n_heads}")
    if (model.d_model // model.attention_n_heads) % 2:
        raise ConfigError(f"head dim {model.d_model // model.attention_n_heads} must be even for RoPE pairs")
    if model.attention_n_heads % model.attention_n_kv_heads:
        raise ConfigError(f"model.attention_n_heads={model.attention_n_heads} is not a multiple of "
                          f"model.attention_n_kv_heads={model.attention_n_kv_heads}")
    tp = parallel.tensor_parallel_size if parallel else 1
    if tp < 1:
        raise ConfigError(f"parallel.tensor_parallel_size must be >= 1, got {tp}")
    for name in ("attention_n_heads", "attention_n_kv_heads", "activation_hidden_dim", "vocab_size"):
        if getattr(model, name) % tp:
            raise ConfigError(f"model.{name}={getattr(model, name)} is not divisible by "
                              f"parallel.tensor_parallel_size={tp}; pick a TP size that divides it")


def validate_config(config: MegapicoConfig, world_size: int | None = None, batch: bool = True) -> None:
    """Cross-field checks, done once. With world_size, also the DP layout and (unless batch=False: a resume first
    derives the accumulation that keeps the run's global batch) the batch arithmetic."""
    validate_model(config.model, config.parallel)
    run_name = config.checkpointing.run_name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run_name) or run_name in (".", ".."):  # it becomes one path component
        raise ConfigError(f"checkpointing.run_name='{run_name}' is not a run name: use letters, digits, '.', '_' and "
                          f"'-' (not '.' or '..')")
    resume = config.checkpointing.resume
    if resume not in ("auto", "true", "false") and not (resume.startswith("step_") and resume[5:].isdigit()):
        raise ConfigError(f"checkpointing.resume='{resume}' is not one of auto, true, false or step_N")
    for dotted, allowed in CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(config), dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}='{value}' is not one of {list(allowed)}")
    if config.data.seq_len > config.model.max_seq_len:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
                          f"{config.model.max_seq_len}")
    train = config.training
    if train.lr_warmup_steps > train.max_steps:
        raise ConfigError(f"training.lr_warmup_steps={train.lr_warmup_steps} exceeds "
                          f"training.max_steps={train.max_steps}")
    if train.loss_chunk_tokens < 1:
        raise ConfigError(f"training.loss_chunk_tokens must be >= 1, got {train.loss_chunk_tokens}")
    tp = config.parallel.tensor_parallel_size
    if config.parallel.sequence_parallel and (train.micro_batch_size * config.data.seq_len) % tp:
        raise ConfigError(f"parallel.sequence_parallel splits micro_batch_size x seq_len = "
                          f"{train.micro_batch_size * config.data.seq_len} tokens over tensor_parallel_size={tp}; "
                          f"pick sizes whose product it divides")
    hub = config.checkpointing.hf_checkpoint
    if config.checkpointing.save_to_hf and not re.fullmatch(r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+", hub.repo_id):
        raise ConfigError(f"checkpointing.save_to_hf needs checkpointing.hf_checkpoint.repo_id=ORG/NAME, got "
                          f"'{hub.repo_id}'")
    if hub.retries < 1:
        raise ConfigError(f"checkpointing.hf_checkpoint.retries must be >= 1, got {hub.retries}")
    if config.checkpointing.keep_last < 0:
        raise ConfigError(f"checkpointing.keep_last must be >= 0 (0 keeps every checkpoint), got "
                          f"{config.checkpointing.keep_last}")
    if config.checkpointing.learning_dynamics.micro_batch_size < 1:
        raise ConfigError("checkpointing.learning_dynamics.micro_batch_size must be >= 1")
    if train.activation_checkpointing.every_n_layers < 1:
        raise ConfigError("training.activation_checkpointing.every_n_layers must be >= 1")
    if world_size is not None:
        tp = config.parallel.tensor_parallel_size
        if world_size % tp:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor_parallel_size={tp}")
        derived = train.micro_batch_size * train.gradient_accumulation_steps * (world_size // tp)
        if batch and train.global_batch_size not in (0, derived):
            raise ConfigError(
                f"training.global_batch_size={train.global_batch_size} != micro_batch_size "
                f"{train.micro_batch_size} x gradient_accumulation_steps {train.gradient_accumulation_steps} x "
                f"data-parallel size {world_size // tp} = {derived}; fix one of them")


def config_to_yaml(config: MegapicoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: MegapicoConfig, path: str | Path) -> None:
    """Write the config under a temporary name and rename it: a link at `path` (a received run directory) is
    replaced, never written through. (megapico.checkpoint.paths does the same for the run's other files; config
    sits below it in the package order.)"""
    path = Path(path)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")  # a new file, random name
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(descriptor, 0o666 & ~mask)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(config_to_yaml(config))
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


