"""The DeepSpeed config dict: the ds_configs JSON plus what megapico's config decides, never both.

Batch sizes, precision (with fp32 gradient accumulation and reduction under bf16), clipping and the optimizer
come from megapico's config, and ZeRO buckets left "auto" are sized to the model; a JSON that states a
different value is an error naming both files, not a silent override (DeepSpeed's own defaults, e.g. for
gradient_clipping, have changed between releases, so megapico always writes them).

Every checkpoint file is read through megapico's one data-only reader (megapico/checkpoint/files.py), which
`engine.load_checkpoint` is made to use. DeepSpeed settings that would load checkpoints some other way are refused
here, before anything is built, each in one line naming the setting (read in DeepSpeed 0.19's engine.load_checkpoint
and create_checkpoint_engine):

- `checkpoint.load_universal`: the universal-checkpoint loader reads `zero/*.pt` and `zero/optimizer_state.pt`
  with torch.load(weights_only=False), beside the checkpoint engine: a pickle there runs.
- `checkpoint.writer`, `datastates_ckpt`, `nebula`: another checkpoint engine (fast, decoupled, DataStates;
  Nebula in older releases) whose load is its own torch.load, not megapico's reader.
- `zero_optimization.offload_optimizer.device` / `offload_param.device` = nvme: loading copies the checkpoint's
  `offloaded_tensors/` tree, which no manifest lists, into the swap folder and reads it as raw optimizer state.
- `zero_optimization.elastic_checkpoint`: see below (megapico reshards itself).

Left alone, because they route no file around the reader: `checkpoint.use_node_local_storage` (which rank writes;
loads still go through the engine), `data_efficiency` / curriculum and random-LTD state (restored from the model
states file the reader returned, and only with a DeepSpeed dataloader, which megapico never gives DeepSpeed),
`checkpoint.tag_validation` and `parallel_write` (saving only).
"""

import json
from pathlib import Path

import torch

from megapico.config import ConfigError, MegapicoConfig
from megapico.training.metrics import parameters_per_tp_rank

OWNED_BY_MEGAPICO = ("optimizer", "scheduler", "fp16")
FP32_GRADIENTS = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
MIN_BUCKET = 40_000_000  # elements; Megatron-LM's DDP bucket (max(40M, 1M x DP))


def resolve_precision(config: MegapicoConfig, cuda: bool | None = None) -> str:
    """training.precision with auto resolved: bf16-mixed on CUDA (pico-train's numerics), fp32 on CPU. `cuda`
    overrides the detection (the memory estimate plans for GPUs from any machine)."""
    precision = config.training.precision
    if precision == "auto":
        return "bf16-mixed" if (torch.cuda.is_available() if cuda is None else cuda) else "fp32"
    return precision


BF16_ENGINE = ("bf16", "lightning-deepspeed-bf16")


def use_bf16(config: MegapicoConfig) -> bool:
    """Whether DeepSpeed's bf16 engine (bf16 module, fp32 masters) runs; bf16-mixed keeps an fp32 engine."""
    return resolve_precision(config) in BF16_ENGINE


def masters_from_fp32_init(config: MegapicoConfig) -> bool:
    """megapico's bf16 loads pico's fp32 initialisation into the masters after DeepSpeed cast the module;
    lightning-deepspeed-bf16 keeps what DeepSpeed (under Lightning) does: masters cloned from the bf16 weights."""
    return resolve_precision(config) == "bf16"


def bucket_plan(local_parameters: int, dp_size: int) -> tuple[int, bool]:
    """(ZeRO reduce/all-gather bucket in elements, overlap_comm). Buckets of max(40M, 1M x DP) elements, never
    more than the model; overlap only when there are at least two buckets: with one, the reduction cannot start
    before the backward ends, and overlap_comm would only add a stream synchronisation per backward."""
    bucket = max(MIN_BUCKET, 1_000_000 * dp_size)
    overlap = local_parameters >= 2 * bucket
    bucket = min(bucket, max(local_parameters, 1))
    return -(-bucket // 512) * 512, overlap  # a multiple of DeepSpeed's NCCL start alignment


def torch_autocast_section(ds: dict, path: Path, mixed: bool) -> dict:
    """bf16-mixed is torch.autocast(bf16) around the forward, and the engine must be the one to enter it: DeepSpeed
    turns off an autocast entered outside its forward unless its own `torch_autocast` is on (its check asks about
    CUDA's autocast only, so this bites on GPUs alone: the whole model ran in fp32, 2.6x slower on an H200).
    No module is "lower precision safe": DeepSpeed would reduce those gradients in bf16; pico's stay fp32."""
    stated = ds.get("torch_autocast", {})
    if stated.get("enabled", "auto") not in ("auto", mixed) or stated.get("dtype", "bfloat16") not in (
            "bfloat16", "bf16", "torch.bfloat16") or stated.get("lower_precision_safe_modules", []):
        raise ConfigError(f"{path}: torch_autocast={json.dumps(stated)} disagrees with training.precision (megapico "
                          f"enables it, in bf16 with fp32 gradients, exactly for bf16-mixed); remove the key")
    return {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []} if mixed else {"enabled": False}


READER = "megapico reads every checkpoint file through its one data-only reader"


def refuse_other_loaders(ds: dict, path: Path) -> None:
    """A ConfigError naming the first setting that would make DeepSpeed load checkpoint files around megapico's reader
    (the list, and why, in the module docstring)."""
    sections = {key: ds.get(key) or {} for key in ("checkpoint", "zero_optimization")}
    for key, section in sections.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {key}={json.dumps(section)} is not a JSON object")
    checkpoint, zero = sections["checkpoint"], sections["zero_optimization"]
    if checkpoint.get("load_universal", False) is not False:
        raise ConfigError(f"{path}: remove checkpoint.load_universal: DeepSpeed's universal-checkpoint loader "
                          f"unpickles zero/*.pt as code (torch.load weights_only=False); {READER}, and reshards on "
                          f"resume itself")
    for name, present in (("checkpoint.writer", checkpoint.get("writer") is not None),
                          ("datastates_ckpt", ds.get("datastates_ckpt", False) is not False),
                          ("nebula", "nebula" in ds)):
        if present:
            raise ConfigError(f"{path}: remove {name}: it replaces DeepSpeed's torch checkpoint engine by one that "
                              f"loads with its own torch.load; {READER}")
    for part in ("offload_optimizer", "offload_param"):
        offload = zero.get(part) or {}
        if isinstance(offload, dict) and str(offload.get("device", "none")).lower() == "nvme":
            raise ConfigError(f"{path}: zero_optimization.{part}.device=nvme: resuming would copy the "
                              f"checkpoint's offloaded_tensors/ (listed in no manifest) into the swap folder and read "
                              f"it as optimizer state; {READER} (use device \"cpu\" or none)")


def build_deepspeed_config(config: MegapicoConfig, dp_size: int) -> dict:
    path = Path(config.training.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"{path}: DeepSpeed config not found (set training.deepspeed_config to a ds_configs/*.json)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: not a JSON object (a DeepSpeed config is one)")
    refuse_other_loaders(ds, path)
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
                          f"{train.precision} (resolved: {resolve_precision(config)})")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    # DeepSpeed would accumulate the micro-steps and reduce over DP in bf16; Megatron uses fp32, and so does
    # megapico's bf16. lightning-deepspeed-bf16 leaves both keys to DeepSpeed's defaults, as Lightning does.
    if resolve_precision(config) == "lightning-deepspeed-bf16":
        for key in FP32_GRADIENTS:
            if key in ds:
                raise ConfigError(f"{path}: {key}={json.dumps(ds[key])} replaces DeepSpeed's default, which "
                                  f"training.precision=lightning-deepspeed-bf16 keeps (pico-train's Lightning "
                                  f"DeepSpeed strategy writes no {key}); remove the key")
    if resolve_precision(config) == "bf16":
        for key, value in FP32_GRADIENTS.items():
            if ds.get(key, value) != value:
                raise ConfigError(f"{path}: {key}={ds[key]} would accumulate or reduce gradients in bf16; megapico's "
                                  f"bf16 keeps fp32 gradients ({key}={value}); remove the key")
            ds[key] = value
    ds["torch_autocast"] = torch_autocast_section(ds, path, resolve_precision(config) == "bf16-mixed")
    zero = ds.setdefault("zero_optimization", {"stage": 2})
    bucket, overlap = bucket_plan(int(parameters_per_tp_rank(config.model, config.parallel.tensor_parallel_size)),
                                  dp_size)
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key, "auto") == "auto":
            zero[key] = bucket
    if zero.get("overlap_comm", "auto") == "auto":
        zero["overlap_comm"] = overlap
    if zero.get("stage") != 2:  # checkpoint resharding reads and writes DeepSpeedZeroOptimizer's partitions
        raise ConfigError(f"{path}: zero_optimization.stage={zero.get('stage')}; megapico runs ZeRO stage 2")
    if zero.get("elastic_checkpoint"):
        # DeepSpeed 0.19's elastic loader asserts on a key its own saver does not write; megapico's reshard
        # (megapico/checkpoint/reshard.py) already loads a checkpoint at any other TP x DP layout.
        raise ConfigError(f"{path}: remove zero_optimization.elastic_checkpoint (megapico reshards on resume)")
    ds.setdefault("steps_per_print", 2**31 - 1)  # megapico logs its own line
    ds.setdefault("wall_clock_breakdown", False)
    return ds
