"""The DeepSpeed engine of a run: pico-decoder on TP layers, pico's AdamW under ZeRO-2, and an engine put where a
checkpoint left off (loaded as saved at the same layout, re-sharded from full tensors at another).

Parallel layout: TP ranks split every layer (megapico.parallel); DeepSpeed ZeRO-2 shards gradients and the
fp32 master weights + Adam state over the data-parallel group only (it learns the groups from `mpu`).
"""

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime import torch_autocast as deepspeed_autocast

from megapico.checkpoint.files import use_data_only_loads
from megapico.checkpoint.reshard import load_full_state_into_engine, read_full_state, write_local_state_into_engine
from megapico.checkpoint.training_state import ResumePoint, checkpoint_root, restore_rng
from megapico.config import MegapicoConfig, TrainingConfig
from megapico.model import PicoDecoder
from megapico.parallel import ParallelState
from megapico.training.activation_checkpointing import apply_activation_checkpointing
from megapico.training.deepspeed_config import build_deepspeed_config, masters_from_fp32_init
from megapico.training.schedule import build_lr_scheduler, lr_at


def build_engine(config: MegapicoConfig, parallel: ParallelState):  # noqa: ANN202
    torch.manual_seed(config.training.seed)  # identical on every rank: TP shards come from one full init
    # At TP=1 the model gets no group: its mappings are then plain identities (no size-1 collectives, clones or
    # autograd nodes); DeepSpeed still gets the size-1 group through `mpu`.
    model = PicoDecoder(config.model, parallel.tp_group if parallel.tp_size > 1 else None,
                        sequence_parallel=config.parallel.sequence_parallel,
                        loss_chunk_tokens=config.training.loss_chunk_tokens)
    apply_activation_checkpointing(model, config.training.activation_checkpointing)
    if config.training.compile:  # per block, in place (torchtitan): state-dict keys stay pico's
        for layer in model.layers:
            # fullgraph: a graph break (a host sync, an op dynamo cannot trace) fails the first step instead of
            # silently splitting the block into slower pieces
            layer.compile(fullgraph=True)
        # the loss head's per-chunk elementwise work: inductor's kernels on GPUs (H200, tiny's head at 32k tokens:
        # 0.0207 s vs 0.0356 s eager); on CPUs the eager in-place passes win (tiny, 2k tokens: 0.54 s vs 0.71 s)
        model.compile_loss_head = torch.cuda.is_available()
    fp32_init = {name: param.detach().clone() for name, param in model.named_parameters()} \
        if masters_from_fp32_init(config) else None
    train = config.training
    # pico's AdamW, as one fused kernel over ZeRO's flat fp32 partition (CPU and CUDA): the default foreach
    # implementation makes ~10 passes over it (16M parameters on CPU: 42 ms -> 7 ms a step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay, fused=True)
    scheduler = build_lr_scheduler(optimizer, train)
    ds_config = build_deepspeed_config(config, parallel.dp_size)
    # DeepSpeed keeps "an engine used torch_autocast" in a process-wide flag no later engine clears; a bf16 engine
    # built after a bf16-mixed one in the same process (tests, benchmarks) would then reduce gradients in bf16
    deepspeed_autocast.TORCH_AUTOCAST_INITIALIZED = ds_config["torch_autocast"]["enabled"]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=parallel)
    use_data_only_loads(engine)  # engine.load_checkpoint reads checkpoints as data, never as code
    if fp32_init is not None:  # DeepSpeed cloned the masters from the bf16-cast module: give them pico's fp32 init
        write_local_state_into_engine(engine, {"weight": fp32_init}, step=None)
    return engine, scheduler


def set_schedule_position(engine, scheduler, step: int, consumed_samples: int,  # noqa: ANN001
                          train: TrainingConfig) -> None:
    """Put an engine whose state was written from full tensors at optimizer step `step`: DeepSpeed's counters, the
    LR scheduler's position and the learning rate the next update uses."""
    engine.global_steps, engine.global_samples = step, consumed_samples
    scheduler.last_epoch = step
    for group in engine.optimizer.optimizer.param_groups:
        group["lr"] = lr_at(step, train)


def resume_engine(engine, scheduler, config: MegapicoConfig, parallel: ParallelState,  # noqa: ANN001
                  point: ResumePoint | None) -> ResumePoint | None:
    """Put the engine at `point` (none: a fresh run) and print where it resumed (rank 0)."""
    if point is None:
        return None
    root = checkpoint_root(config)
    if (point.tensor_parallel_size, point.data_parallel_size) == (parallel.tp_size, parallel.dp_size):
        engine.load_checkpoint(str(root), tag=point.tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if config.training.change_schedule_on_resume:  # the loaded scheduler holds the old lr: take the new one
            scheduler.base_lrs = [config.training.lr for _ in scheduler.base_lrs]
            set_schedule_position(engine, scheduler, point.step, point.consumed_samples, config.training)
    else:  # another layout: full tensors from the saved shards, re-sharded for this one
        full = read_full_state(root / point.tag, point.tensor_parallel_size, point.data_parallel_size, point.bf16)
        load_full_state_into_engine(engine, full, parallel.tp_rank, parallel.tp_size)
        set_schedule_position(engine, scheduler, point.step, point.consumed_samples, config.training)
    restore_rng(config, point)
    if dist.get_rank() == 0:
        for rejected in point.rejected:
            print(f"warning: checkpoint {rejected}; falling back to an earlier one", flush=True)
        before = f"TP={point.tensor_parallel_size} x DP={point.data_parallel_size}"
        after = f"TP={parallel.tp_size} x DP={parallel.dp_size}"
        batch = config.training.global_batch_size
        print(f"resumed from {root / point.tag}: step {point.step}, {point.consumed_samples} consumed samples, layout "
              f"{before} -> {after} ({'same layout' if before == after else 're-sharded'}), global batch {batch}, "
              f"verified "
              f"({'sizes + sha256' if config.checkpointing.verify == 'hash' else 'sizes'} of {point.verified_files} "
              f"files)", flush=True)
    return point


__all__ = ["build_engine", "resume_engine", "set_schedule_position"]
