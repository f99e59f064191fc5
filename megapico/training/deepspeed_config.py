"""The DeepSpeed config dict: the ds_configs JSON plus what megapico's config decides, never both.

Batch sizes, precision, clipping and the optimizer come from megapico's config; a JSON that states a
different value is an error naming both files, not a silent override (DeepSpeed's own defaults, e.g. for
gradient_clipping, have changed between releases, so megapico always writes them).
"""

import json
from pathlib import Path

import torch

from megapico.config import ConfigError, MegapicoConfig

OWNED_BY_MEGAPICO = ("optimizer", "scheduler", "fp16")


def use_bf16(config: MegapicoConfig) -> bool:
    precision = config.training.precision
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def build_deepspeed_config(config: MegapicoConfig, dp_size: int) -> dict:
    path = Path(config.training.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found (set training.deepspeed_config to a ds_configs/*.json)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    for key in OWNED_BY_MEGAPICO:
        if key in ds and (key != "fp16" or ds[key].get("enabled", False)):
            raise ConfigError(f"{path}: remove '{key}': megapico sets it from training.* (pico recipe: AdamW + "
                              f"warmup/decay schedule, bf16)")
    train = config.training
    owned = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * dp_size,
        "gradient_clipping": train.gradient_clipping,
    }
    for key, value in owned.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"{path}: {key}={ds[key]} disagrees with the megapico config ({value}); set it to "
                              f"\"auto\" or remove it")
        ds[key] = value
    bf16 = use_bf16(config)
    if "bf16" in ds and ds["bf16"].get("enabled", "auto") not in ("auto", bf16):
        raise ConfigError(f"{path}: bf16.enabled={ds['bf16']['enabled']} disagrees with training.precision="
                          f"{train.precision} (resolved: {'bf16' if bf16 else 'fp32'})")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    if zero.get("stage") != 2:  # checkpoint resharding reads and writes DeepSpeedZeroOptimizer's partitions
        raise ConfigError(f"{path}: zero_optimization.stage={zero.get('stage')}; megapico runs ZeRO stage 2")
    if zero.get("elastic_checkpoint"):
        # DeepSpeed 0.19's elastic loader asserts on a key its own saver does not write; megapico's reshard
        # (megapico/checkpoint/reshard.py) already loads a checkpoint at any other TP x DP layout.
        raise ConfigError(f"{path}: remove zero_optimization.elastic_checkpoint (megapico reshards on resume)")
    ds.setdefault("steps_per_print", 2**31 - 1)  # megapico logs its own line
    ds.setdefault("wall_clock_breakdown", False)
    return ds
