"""The pretraining loop, readable top to bottom: set up -> (resume) -> steps with logging, eval, checkpoints.

Parallel layout: TP ranks split every layer (megapico.parallel); DeepSpeed ZeRO-2 shards gradients and the
fp32 master weights + Adam state over the data-parallel group only (it learns the groups from `mpu`).
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from megapico.checkpoint.reshard import load_full_state_into_engine, read_full_state
from megapico.checkpoint.training_state import (
    checkpoint_root,
    find_resume_point,
    restore_rng,
    save_training_checkpoint,
)
from megapico.config import ConfigError, MegapicoConfig, config_to_yaml, save_config, validate_config
from megapico.data.builders import build_dataset, parse_blend
from megapico.data.indexed_dataset import DataError, IndexedDataset
from megapico.data.sampler import PretrainingSampler, collate_samples
from megapico.data.tokenizer import load_tokenizer
from megapico.model import PicoDecoder
from megapico.parallel import ParallelState, init_distributed
from megapico.training.activation_checkpointing import apply_activation_checkpointing
from megapico.training.deepspeed_config import build_deepspeed_config
from megapico.training.evaluation import evaluate_perplexity
from megapico.training.learning_dynamics import fixed_batch, save_learning_dynamics
from megapico.training.logger import RunLogger
from megapico.training.metrics import flops_per_token
from megapico.training.schedule import build_lr_scheduler, lr_at


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    perplexities: dict[int, float] = field(default_factory=dict)
    run_dir: Path | None = None
    resumed_from: int | None = None


def check_data_fits_model(config: MegapicoConfig) -> None:
    """Before any compute: the tokenizer and the token ids in the data must fit the model's vocabulary."""
    vocab = config.model.vocab_size
    if config.data.tokenizer:
        tokenizer = load_tokenizer(config.data.tokenizer)
        if tokenizer.vocab_size > vocab:
            raise ConfigError(f"{config.data.tokenizer}: tokenizer has {tokenizer.vocab_size} tokens but "
                              f"model.vocab_size is {vocab}")
    for _, prefix in parse_blend(config.data.train_data_path) + (
            parse_blend(config.data.eval_data_path) if config.data.eval_data_path else []):
        largest = IndexedDataset(prefix).max_token_id()  # the first 16M tokens: cheap, and catches a wrong tokenizer
        if largest >= vocab:
            raise DataError(f"{prefix}.bin: token id {largest} >= model.vocab_size {vocab} (was it tokenized with "
                            f"another tokenizer?)")


def build_engine(config: MegapicoConfig, parallel: ParallelState):  # noqa: ANN202
    torch.manual_seed(config.training.seed)  # identical on every rank: TP shards come from one full init
    model = PicoDecoder(config.model, parallel.tp_group)
    apply_activation_checkpointing(model, config.training.activation_checkpointing)
    train = config.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay)
    scheduler = build_lr_scheduler(optimizer, train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(config, parallel.dp_size), mpu=parallel)
    return engine, scheduler


def _resume(engine, scheduler, config: MegapicoConfig, parallel: ParallelState):  # noqa: ANN001, ANN202
    point = find_resume_point(config)
    if point is None:
        return None
    root = checkpoint_root(config)
    if (point.tensor_parallel_size, point.data_parallel_size) == (parallel.tp_size, parallel.dp_size):
        engine.load_checkpoint(str(root), tag=point.tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    else:  # another layout: full tensors from the saved shards, re-sharded for this one
        full = read_full_state(root / point.tag, point.tensor_parallel_size, point.data_parallel_size, point.bf16)
        load_full_state_into_engine(engine, full, parallel.tp_rank, parallel.tp_size)
        engine.global_steps, engine.global_samples = point.step, point.consumed_samples
        scheduler.last_epoch = point.step
        for group in engine.optimizer.optimizer.param_groups:
            group["lr"] = lr_at(point.step, config.training)
    restore_rng(config, point)
    return point


def build_eval_dataset(config: MegapicoConfig, parallel: ParallelState):  # noqa: ANN202
    data, evaluation = config.data, config.evaluation
    wanted = evaluation.max_batches * config.training.micro_batch_size * parallel.dp_size or 1
    if data.eval_data_path:
        return build_dataset(data.eval_data_path, "train", wanted, data.seq_len, data.seed, "1,0,0", data.cache_dir)
    return build_dataset(data.train_data_path, "valid", wanted, data.seq_len, data.seed, data.split, data.cache_dir)


def pretrain(config: MegapicoConfig) -> TrainResult:
    init_distributed()
    world = dist.get_world_size()
    validate_config(config, world_size=world)
    parallel = ParallelState.build(config.parallel.tensor_parallel_size)
    train, data = config.training, config.data
    run_dir = Path(config.checkpointing.runs_dir) / config.checkpointing.run_name
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(config_to_yaml(config), flush=True)
        save_config(config, run_dir / "config.yaml")
    check_data_fits_model(config)
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * parallel.dp_size
    train_dataset = build_dataset(data.train_data_path, "train", train.max_steps * global_batch, data.seq_len,
                                  data.seed, data.split, data.cache_dir)
    eval_dataset = build_eval_dataset(config, parallel)

    engine, scheduler = build_engine(config, parallel)
    resumed = _resume(engine, scheduler, config, parallel)
    start_step, consumed = (resumed.step, resumed.consumed_samples) if resumed else (0, 0)
    result = TrainResult(run_dir=run_dir, resumed_from=resumed.step if resumed else None)
    sampler = PretrainingSampler(len(train_dataset), consumed, train.micro_batch_size, parallel.dp_rank,
                                 parallel.dp_size)
    batches = iter(DataLoader(train_dataset, batch_sampler=sampler, collate_fn=collate_samples,
                              pin_memory=torch.cuda.is_available()))
    logger = RunLogger(config, run_dir, parallel, flops_per_token(config.model, data.seq_len) * global_batch *
                       data.seq_len)

    dynamics = config.checkpointing.learning_dynamics
    dynamics_batches = {"train": fixed_batch(train_dataset, dynamics.batch_size),
                        "val": fixed_batch(eval_dataset, dynamics.batch_size)} if dynamics.enabled else {}
    for split, samples in dynamics_batches.items():
        if len(samples) < dynamics.batch_size:
            logger.warn(f"learning dynamics: the {split} set holds {len(samples)} sequences, fewer than "
                        f"checkpointing.learning_dynamics.batch_size={dynamics.batch_size}; using all of them "
                        f"(pico-analyze's pwcca needs more than d_model={config.model.d_model})")

    def save_checkpoint(step: int) -> None:
        """Learning dynamics first, then the engine: `latest` moves only once both are on disk."""
        if dynamics_batches:
            save_learning_dynamics(engine.module, dynamics_batches,
                                   checkpoint_root(config) / f"step_{step}" / "learning_dynamics",
                                   train.micro_batch_size, parallel.dp_rank, engine.device)
        save_training_checkpoint(engine, config, parallel, step, consumed)

    def run_eval(step: int) -> None:
        perplexity = evaluate_perplexity(engine.module, eval_dataset, train.micro_batch_size, parallel,
                                         config.evaluation.max_batches, engine.device)
        result.perplexities[step] = perplexity
        logger.log_eval(step, perplexity)

    engine.train()
    if resumed is None and dynamics_batches:
        save_checkpoint(0)  # pico keeps the initial model and its learning dynamics as step_0
    for step in range(start_step + 1, train.max_steps + 1):
        started = time.perf_counter()
        micro_losses = []
        for _ in range(train.gradient_accumulation_steps):
            input_ids, labels = (t.to(engine.device, non_blocking=True) for t in next(batches))
            loss = engine(input_ids, labels)
            if not _all_finite(loss):
                if train.nan_policy == "stop":
                    raise NonFiniteLossError(f"step {step}: loss is {loss.item()} (NaN/inf); lower training.lr, "
                                             f"set training.gradient_clipping, or training.nan_policy=skip")
                logger.warn(f"step {step}: non-finite loss, this micro batch contributes no gradient")
                loss = sum(p.view(-1)[0] for p in engine.module.parameters()) * 0.0
            engine.backward(loss)
            engine.step()
            micro_losses.append(loss.detach().float())
        consumed += global_batch
        step_loss = _mean_over_dp(torch.stack(micro_losses).mean(), parallel)
        result.losses[step] = step_loss
        logger.log_step(step, step_loss, scheduler.get_last_lr()[0], _grad_norm(engine), time.perf_counter() - started,
                        consumed)
        is_last = step == train.max_steps
        if (config.evaluation.interval and step % config.evaluation.interval == 0) or is_last:
            run_eval(step)
        exiting = bool(train.exit_interval) and step % train.exit_interval == 0
        if step % config.checkpointing.save_interval == 0 or is_last or exiting:
            save_checkpoint(step)
        if exiting and not is_last:
            logger.warn(f"step {step}: training.exit_interval={train.exit_interval} reached; checkpoint saved, "
                        f"exiting (rerun the same command to resume)")
            break
    logger.finish()
    return result


def _all_finite(loss: torch.Tensor) -> bool:
    """Every rank must take the same branch, so the verdict is agreed over the whole world."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def _mean_over_dp(value: torch.Tensor, parallel: ParallelState) -> float:
    if parallel.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, group=parallel.dp_group)
        value /= parallel.dp_size
    return value.item()


def _grad_norm(engine) -> float:  # noqa: ANN001
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


__all__ = ["NonFiniteLossError", "TrainResult", "check_data_fits_model", "pretrain"]
