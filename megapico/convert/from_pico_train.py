"""A pico-train checkpoint (HF files + fabric_state/) -> a verified megapico checkpoint at the same step, so a
pico-train run (the published ones included) continues under megapico with its optimizer state and data order.

pico-train writes two layouts of `fabric_state/`:
- one device: `checkpoint.pt`, Lightning Fabric's save of {"_model": state dict, "_optimizer": torch AdamW state
  dict, "_lr_scheduler": LambdaLR state dict, "_checkpoint_step": N, "_rng_states"}. AdamW's state is indexed by
  the position of each parameter in the model's parameters(); pico's state dict lists exactly those parameters in
  that order, so index i is the i-th key, checked by shape for every tensor (a mismatch is an error, never a
  silent misassignment).
- more than one device (Lightning's DeepSpeed strategy, ZeRO-2): `latest` (the tag, "checkpoint"),
  `zero_to_fp32.py` and `checkpoint/{mp_rank_00_model_states.pt, [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt}`
  for R < N ranks, read with DeepSpeed's own layout (the saved param_shapes name every tensor of the flat ZeRO
  partitions; megapico.checkpoint.reshard.read_full_state) into fp32 masters and Adam moments.

The result is written the way pretrain.py writes a checkpoint: one process builds the run's DeepSpeed engine
(TP=1, DP=1), takes the full state (weights, fp32 masters, Adam moments and step), sets the schedule to step N and
consumed samples to N x the global batch (pico's row order: the next step trains rows [N G, (N+1) G)), and saves
runs/RUN/checkpoints/step_N + latest; pretrain.py resumes it at any TP x DP layout. The written files are read back
and compared with what was imported, bit for bit. Everything is checked before anything is written.
Host memory: the imported fp32 state (weights + two moments) once, plus the engine's own copy while it saves.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megapico.checkpoint.files import CheckpointError, read_checkpoint_file
from megapico.checkpoint.paths import checkpoint_tag
from megapico.checkpoint.reshard import MOMENTS, read_full_state, zero_shard_path
from megapico.config import ConfigError, MegapicoConfig, ModelConfig, validate_config
from megapico.convert.from_hf import read_pico_hf
from megapico.convert.received import save_run_tokenizer
from megapico.parallel import free_port


@dataclass
class PicoTrainCheckpoint:
    model: ModelConfig
    global_batch: int
    step: int
    full: dict  # {"weight" | "exp_avg" | "exp_avg_sq": {name: fp32 tensor}, "step": N}
    optimizer_options: dict  # lr (initial), betas, eps, weight_decay of pico's AdamW, where the file has them
    layout: str


def _read_one_device(path: Path) -> tuple[dict, dict, int]:
    state = read_checkpoint_file(path)
    missing = [key for key in ("_model", "_optimizer", "_checkpoint_step") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: no '{missing[0]}'; not a pico-train fabric checkpoint")
    weights = {name: tensor.float() for name, tensor in state["_model"].items()}
    names = list(weights)
    optimizer = state["_optimizer"]
    indices = [index for group in optimizer["param_groups"] for index in group["params"]]
    if len(indices) != len(names):
        raise CheckpointError(f"{path}: the optimizer holds {len(indices)} parameters but the model state "
                              f"{len(names)}; cannot map them by name")
    moments = {moment: {} for moment in MOMENTS}
    steps = set()
    for index, name in zip(indices, names, strict=True):
        adam = optimizer["state"].get(index)
        if adam is None:  # before the first optimizer step AdamW has no state
            for moment in MOMENTS:
                moments[moment][name] = torch.zeros_like(weights[name])
            steps.add(0)
            continue
        for moment in MOMENTS:
            if adam[moment].shape != weights[name].shape:
                raise CheckpointError(f"{path}: optimizer entry {index} has {moment} of shape "
                                      f"{tuple(adam[moment].shape)} but parameter {index} is {name} of shape "
                                      f"{tuple(weights[name].shape)}; the parameter order is not pico's")
            moments[moment][name] = adam[moment].float()
        steps.add(int(adam["step"]))
    group = optimizer["param_groups"][0]
    options = {"lr": group.get("initial_lr", group.get("lr")), "betas": tuple(group["betas"]), "eps": group["eps"],
               "weight_decay": group["weight_decay"]}
    return {"weight": weights, **moments, "steps": steps}, options, int(state["_checkpoint_step"])


def _read_deepspeed(fabric: Path) -> tuple[dict, dict, int, str]:
    tag = checkpoint_tag((fabric / "latest").read_text(), fabric / "latest")
    directory = fabric / tag
    if not (directory / "mp_rank_00_model_states.pt").is_file():
        raise CheckpointError(f"{directory / 'mp_rank_00_model_states.pt'}: missing; not a complete DeepSpeed "
                              f"checkpoint")
    if (directory / "mp_rank_01_model_states.pt").exists():
        raise CheckpointError(f"{directory}: holds model-parallel ranks; pico-train's DeepSpeed checkpoints have one")
    client = read_checkpoint_file(directory / "mp_rank_00_model_states.pt")
    bf16 = any(directory.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    files = sorted(directory.glob(f"{'bf16_' if bf16 else ''}zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    ranks = int(client.get("dp_world_size", len(files)))  # DeepSpeed records the DP size it saved from
    for rank in range(ranks):
        if not zero_shard_path(directory, rank, 0, bf16).is_file():
            raise CheckpointError(f"{zero_shard_path(directory, rank, 0, bf16)}: missing (the checkpoint has ZeRO "
                                  f"files of {ranks} ranks; copy it whole)")
    try:
        full = read_full_state(directory, 1, ranks, bf16, model_states_of_tp_rank_0=client)
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{directory}: not DeepSpeed's ZeRO-2 layout ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120]})") from None
    step = int(client.get("_checkpoint_step", full["step"]))
    full["steps"] = {full.pop("step")}
    layout = f"DeepSpeed ZeRO-2 of {ranks} rank{'s' if ranks > 1 else ''}, {'bf16' if bf16 else 'fp32'} engine"
    return full, {}, step, layout


def read_pico_train_checkpoint(directory: str | Path) -> PicoTrainCheckpoint:
    """Read and check a pico-train step directory; every problem is a CheckpointError naming the file."""
    directory = Path(directory)
    model, hf_weights = read_pico_hf(directory)
    batch = json.loads((directory / "config.json").read_text()).get("batch_size")
    fabric = directory / "fabric_state"
    if (fabric / "checkpoint.pt").is_file():
        try:
            full, options, step = _read_one_device(fabric / "checkpoint.pt")
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{fabric / 'checkpoint.pt'}: not the layout of pico-train's one-device checkpoint "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
                                  ) from None
        layout = "one device (fabric_state/checkpoint.pt)"
    elif (fabric / "latest").is_file():
        full, options, step, layout = _read_deepspeed(fabric)
    else:
        raise CheckpointError(f"{fabric}: neither checkpoint.pt (one device) nor DeepSpeed's 'latest'; "
                              f"{directory} is not a pico-train checkpoint with its training state")
    steps = full.pop("steps")
    if steps != {step}:
        raise CheckpointError(f"{fabric}: the optimizer has taken {sorted(steps)} steps but the checkpoint is of step "
                              f"{step}")
    for kind in ("weight", *MOMENTS):
        if full[kind].keys() != hf_weights.keys():
            extra = sorted(full[kind].keys() ^ hf_weights.keys())[0]
            raise CheckpointError(f"{fabric}: {kind} names differ from {directory / 'model.safetensors'} "
                                  f"(first: {extra})")
        for name, tensor in full[kind].items():
            if tensor.shape != hf_weights[name].shape:
                raise CheckpointError(f"{fabric}: {kind} of {name} has shape {tuple(tensor.shape)}, the HF weight "
                                      f"{tuple(hf_weights[name].shape)}")
    for name, weight in full["weight"].items():  # the HF files hold the module's weights: fp32, or their bf16 copy
        if not torch.equal(weight.to(hf_weights[name].dtype), hf_weights[name]) and not torch.equal(
                weight.bfloat16().float(), hf_weights[name]):
            raise CheckpointError(f"{fabric}: {name} differs from {directory / 'model.safetensors'}; the HF files and "
                                  f"the training state are of different steps")
    if not isinstance(batch, int) or batch < 1:
        raise CheckpointError(f"{directory / 'config.json'}: no batch_size (pico's global batch)")
    full["step"] = step
    return PicoTrainCheckpoint(model, batch, step, full, options, layout)


def check_recipe(checkpoint: PicoTrainCheckpoint, config: MegapicoConfig) -> None:
    """The run that continues must be pico's: same model, global batch and AdamW hyperparameters."""
    for name, value in vars(checkpoint.model).items():
        if getattr(config.model, name) != value:
            raise ConfigError(f"model.{name}={getattr(config.model, name)} but the pico-train checkpoint has {value}; "
                              f"use the recipe of its size (model_preset)")
    train = config.training
    if train.global_batch_size not in (0, checkpoint.global_batch):
        raise ConfigError(f"training.global_batch_size={train.global_batch_size} but the pico-train run's is "
                          f"{checkpoint.global_batch}; its row order needs the same global batch")
    wanted = {"lr": train.lr, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_eps,
              "weight_decay": train.weight_decay}
    for key, value in checkpoint.optimizer_options.items():
        if (tuple(value) if key == "betas" else value) != wanted[key]:
            raise ConfigError(f"training: pico-train's AdamW has {key}={value}, the megapico config {wanted[key]}; "
                              f"set it to pico's so the continued run is the same run")


def _save_rank(rank: int, port: int, config: MegapicoConfig, checkpoint: PicoTrainCheckpoint) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from megapico.checkpoint.reshard import load_full_state_into_engine
    from megapico.checkpoint.training_state import save_training_checkpoint
    from megapico.parallel import ParallelState, init_distributed
    from megapico.training.trainer import build_engine, set_schedule_position

    init_distributed()
    parallel = ParallelState.build(1)
    engine, scheduler = build_engine(config, parallel)
    load_full_state_into_engine(engine, checkpoint.full, 0, 1)
    consumed = checkpoint.step * checkpoint.global_batch
    set_schedule_position(engine, scheduler, checkpoint.step, consumed, config.training)
    save_training_checkpoint(engine, config, parallel, checkpoint.step, consumed)
    torch.distributed.destroy_process_group()


def pico_train_to_megapico(directory: str | Path, config: MegapicoConfig) -> tuple[Path, PicoTrainCheckpoint]:
    """Write runs/{run}/checkpoints/step_N (+ latest) from a pico-train step directory; returns it and what was
    read. Refuses a run directory that already holds checkpoints."""
    checkpoint = read_pico_train_checkpoint(directory)
    if not config.model_preset:  # no size named: the model section is the checkpoint's (as convert_from_hf does)
        config.model = checkpoint.model
    check_recipe(checkpoint, config)
    root = Path(config.checkpointing.runs_dir) / config.checkpointing.run_name / "checkpoints"
    if root.exists() and any(root.iterdir()):
        raise CheckpointError(f"{root}: already holds checkpoints; choose another run (--output runs/NEW)")
    # written by one process: TP=1, DP=1, the whole global batch as one micro batch (no activations are made)
    config.parallel.tensor_parallel_size, config.parallel.sequence_parallel = 1, False
    config.training.micro_batch_size, config.training.gradient_accumulation_steps = checkpoint.global_batch, 1
    config.training.global_batch_size = checkpoint.global_batch
    try:  # the whole config the checkpoint will carry, as pretrain.py would check it, before anything is written
        validate_config(config, world_size=1)
    except ConfigError as err:
        raise ConfigError(f"the imported run's config: {err}") from None
    run_dir = root.parent
    created = not run_dir.exists()
    try:
        mp.spawn(_save_rank, args=(free_port(), config, checkpoint), nprocs=1, join=True)
        written = root / f"step_{checkpoint.step}"
        bf16 = json.loads((written / "megapico_state.json").read_text())["bf16"]
        back = read_full_state(written, 1, 1, bf16)
        for kind in ("weight", *MOMENTS):
            for name, tensor in checkpoint.full[kind].items():
                if not torch.equal(back[kind][name], tensor):
                    raise CheckpointError(f"{written}: {kind} of {name} reads back different from the import")
        if back["step"] != checkpoint.step:
            raise CheckpointError(f"{written}: Adam's step reads back as {back['step']}, not {checkpoint.step}")
        if config.data.tokenizer:
            save_run_tokenizer(run_dir, config.data.tokenizer)
    except BaseException:
        shutil.rmtree(run_dir if created else root, ignore_errors=True)
        raise
    return written, checkpoint
