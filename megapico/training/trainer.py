"""The pretraining loop, readable top to bottom: set up -> (resume) -> steps with logging, eval, checkpoints.

Parallel layout: TP ranks split every layer (megapico.parallel); DeepSpeed ZeRO-2 shards gradients and the
fp32 master weights + Adam state over the data-parallel group only (it learns the groups from `mpu`).
"""

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime import torch_autocast as deepspeed_autocast
from torch.utils.data import DataLoader

from megapico.checkpoint.files import use_data_only_loads
from megapico.checkpoint.manifest import disk_bytes, write_manifest
from megapico.checkpoint.paths import CheckpointError, refuse_links
from megapico.checkpoint.reshard import (
    gather_master_weights,
    load_full_state_into_engine,
    read_full_state,
    write_local_state_into_engine,
)
from megapico.checkpoint.run_lock import STALE_S, RunLock, RunLockedError
from megapico.checkpoint.training_state import (
    ResumePoint,
    agreed_resume_point,
    checkpoint_root,
    clear_step_directory,
    continue_the_saved_run,
    has_learning_dynamics,
    restore_rng,
    save_training_checkpoint,
    unfinished_checkpoints,
)
from megapico.config import (
    ConfigError,
    MegapicoConfig,
    TrainingConfig,
    config_to_yaml,
    save_config,
    validate_config,
)
from megapico.data.builders import build_dataset, build_train_dataset, parse_blend
from megapico.data.indexed_dataset import DataError, IndexedDataset
from megapico.data.pretokenized_dataset import TextDocuments
from megapico.data.provenance import check_tokenizer_for_data, record_path
from megapico.data.sampler import PretrainingSampler, collate_samples
from megapico.data.tokenizer import load_tokenizer
from megapico.model import PicoDecoder
from megapico.parallel import ParallelState, init_distributed
from megapico.training.activation_checkpointing import apply_activation_checkpointing
from megapico.training.deepspeed_config import (
    build_deepspeed_config,
    masters_from_fp32_init,
    resolve_precision,
)
from megapico.training.evaluation import evaluate_perplexity, evaluate_text_perplexity
from megapico.training.learning_dynamics import (
    first_sequences,
    next_global_batch,
    probe_precision,
    save_learning_dynamics,
)
from megapico.training.logger import RunLogger
from megapico.training.metrics import flops_per_token
from megapico.training.preemption import StopSignal
from megapico.training.schedule import build_lr_scheduler, lr_at


class NonFiniteLossError(RuntimeError):
    pass


class CheckpointPublisher(Protocol):
    """What training asks of a publisher (megapico.publish.BackgroundPublisher, handed in by pretrain.py): told of
    each complete checkpoint, polled at step ends, closed at the end; none of the three may block on the network."""

    def checkpoint_saved(self) -> None: ...

    def poll(self) -> list[str]: ...

    def close(self, timeout_s: float) -> list[str]: ...


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    perplexities: dict[int, float] = field(default_factory=dict)
    run_dir: Path | None = None
    resumed_from: int | None = None


def check_data_fits_model(config: MegapicoConfig) -> None:
    """Before any compute: the tokenizer's ids and the data's must fit the model's vocabulary, and the tokenizer
    must be the one the data was built with (the fingerprint preprocessing records beside it)."""
    vocab = config.model.vocab_size
    prefixes = [prefix for _, prefix in parse_blend(config.data.train_data_path) + (
        parse_blend(config.data.eval_data_path) if config.data.eval_data_path else [])]
    check_tokenizer_for_data(prefixes, config.data.tokenizer or None, vocab)
    for prefix in prefixes:  # data without the record (Megatron's, older megapico's): the first 16M tokens
        if record_path(prefix).is_file():  # its largest id was recorded whole and checked just above
            continue
        largest = IndexedDataset(prefix).max_token_id()
        if largest >= vocab:
            raise DataError(f"{prefix}.bin: token id {largest} >= model.vocab_size {vocab} (was it tokenized with "
                            f"another tokenizer?)")


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


def _resume(engine, scheduler, config: MegapicoConfig, parallel: ParallelState,  # noqa: ANN001
            point: ResumePoint | None) -> ResumePoint | None:
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


def fp32_weights(engine) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """This TP rank's fp32 weights being trained: the ZeRO masters in a bf16 engine (all-gathered over DP), the
    module itself otherwise."""
    if engine.bfloat16_enabled():
        return gather_master_weights(engine)
    return engine.module.state_dict()


def build_eval_dataset(config: MegapicoConfig, parallel: ParallelState):  # noqa: ANN202
    """The eval set: TextDocuments of data.eval_data_path for evaluation.perplexity=pico, else seq_len samples of
    data.eval_data_path (whole) or of the train prefix's valid split."""
    data, evaluation = config.data, config.evaluation
    if evaluation.perplexity == "pico":
        blend = parse_blend(data.eval_data_path) if data.eval_data_path else []
        if len(blend) != 1:
            raise ConfigError(f"evaluation.perplexity=pico scores every document of one prefix as a text; set "
                              f"data.eval_data_path to one prefix (pico's paloma texts, preprocessed without "
                              f"--append-eod), got {list(data.eval_data_path)}")
        return TextDocuments(IndexedDataset(blend[0][1]), config.model.max_seq_len, "evaluation")
    wanted = evaluation.max_batches * config.training.micro_batch_size * parallel.dp_size or 1
    if data.eval_data_path:
        return build_dataset(data.eval_data_path, "train", wanted, data.seq_len, data.seed, "1,0,0", data.cache_dir)
    return build_dataset(data.train_data_path, "valid", wanted, data.seq_len, data.seed, data.split, data.cache_dir)


def learning_dynamics_val_set(config: MegapicoConfig, eval_dataset) -> list:  # noqa: ANN001
    """Every document of checkpointing.learning_dynamics.eval_data_path, each at its own length (at most
    max_seq_len + 1 tokens); without one, the first learning_dynamics.batch_size sequences of the eval set."""
    dynamics = config.checkpointing.learning_dynamics
    if not dynamics.eval_data_path:
        return first_sequences(eval_dataset, dynamics.batch_size)
    documents = TextDocuments(IndexedDataset(dynamics.eval_data_path), config.model.max_seq_len + 1,
                              "learning-dynamics val")
    return first_sequences(documents, len(documents))


def _hold_run_directory(config: MegapicoConfig, run_dir: Path) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank raises the same RunLockedError when a live run holds it."""
    lock, outcome = None, [None]
    if dist.get_rank() == 0:
        hub = config.checkpointing.hf_checkpoint  # the end of a run may wait that long for uploads, without beats
        lock = RunLock(run_dir, STALE_S + (hub.wait_at_end_s if config.checkpointing.save_to_hf else 0.0))
        try:
            if run_dir.exists() or run_dir.is_symlink():
                refuse_links(run_dir)  # a received run directory: no link may steer a write or a delete elsewhere
            taken_over = lock.acquire()
            if taken_over:
                print(f"warning: {taken_over}", flush=True)
        except (RunLockedError, CheckpointError) as err:
            outcome = [str(err)]
        except OSError as err:  # a file where the run directory should be, no permission: every rank stops alike
            outcome = [f"{run_dir}: cannot take the run directory ({type(err).__name__}: {err.strerror or err})"]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunLockedError(outcome[0])
    return lock


def pretrain(config: MegapicoConfig, after_checkpoint: Callable[[Path], list[str]] | None = None,
             publisher: CheckpointPublisher | None = None) -> TrainResult:
    """Train per `config`. after_checkpoint(checkpoints_root) runs on rank 0 after each checkpoint is complete (the
    retention of checkpointing.keep_last, wired by pretrain.py) and returns lines to print; `publisher` (rank 0's,
    checkpointing.save_to_hf) is told of each complete checkpoint and publishes it off the training path. The run
    directory is held for the run's lifetime (megapico/checkpoint/run_lock.py); one this launch created is removed
    again if the start fails before the first step."""
    init_distributed()
    validate_config(config, world_size=dist.get_world_size(), batch=False)  # whole once the resume point is known
    parallel = ParallelState.build(config.parallel.tensor_parallel_size)
    run_dir = Path(config.checkpointing.runs_dir) / config.checkpointing.run_name
    created = not run_dir.exists()
    lock = _hold_run_directory(config, run_dir)
    progress = {"started": False}
    publisher = publisher if dist.get_rank() == 0 else None
    try:
        return _pretrain(config, parallel, run_dir, lock, progress, after_checkpoint, publisher)
    except BaseException:
        for line in publisher.close(0.0) if publisher is not None else []:  # the tool completes it later
            print(line, flush=True)
        if dist.get_rank() == 0 and created and not progress["started"]:
            shutil.rmtree(run_dir, ignore_errors=True)
            lock = None
        raise
    finally:
        if lock is not None:
            lock.release()


def _pretrain(config: MegapicoConfig, parallel: ParallelState, run_dir: Path, lock: RunLock | None,
              progress: dict, after_checkpoint: Callable[[Path], list[str]] | None,
              publisher: CheckpointPublisher | None) -> TrainResult:
    train, data = config.training, config.data
    for unfinished in unfinished_checkpoints(config) if dist.get_rank() == 0 else []:
        print(f"warning: {unfinished}: a half-written checkpoint (no manifest.json: its save did not finish); it "
              f"is not resumed from, and is replaced when its step is saved again", flush=True)
    point = agreed_resume_point(config)
    lines = continue_the_saved_run(config, point, parallel.dp_size) if point is not None else []
    validate_config(config, world_size=dist.get_world_size())
    for line in lines if dist.get_rank() == 0 else []:
        print(f"resume: {line}", flush=True)
    if dist.get_rank() == 0:
        print(config_to_yaml(config), flush=True)
        save_config(config, run_dir / "config.yaml")
    check_data_fits_model(config)
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * parallel.dp_size
    train_dataset = build_train_dataset(data, train.max_steps * global_batch)
    if data.samples == "pretokenized" and train_dataset.steps_covered(global_batch) < train.max_steps:
        raise ConfigError(f"{train_dataset.indexed.prefix}: {len(train_dataset):,} rows cover "
                          f"{train_dataset.steps_covered(global_batch):,} steps of global batch {global_batch}, but "
                          f"training.max_steps={train.max_steps}; set training.max_steps <= "
                          f"{train_dataset.steps_covered(global_batch)} or add rows")
    eval_dataset = build_eval_dataset(config, parallel)

    engine, scheduler = build_engine(config, parallel)
    resumed = _resume(engine, scheduler, config, parallel, point)
    start_step, consumed = (resumed.step, resumed.consumed_samples) if resumed else (0, 0)
    result = TrainResult(run_dir=run_dir, resumed_from=resumed.step if resumed else None)
    sampler = PretrainingSampler(len(train_dataset), consumed, train.micro_batch_size, parallel.dp_rank,
                                 parallel.dp_size)
    batches = iter(DataLoader(train_dataset, batch_sampler=sampler, collate_fn=collate_samples,
                              pin_memory=torch.cuda.is_available()))
    logger = RunLogger(config, run_dir, parallel, flops_per_token(config.model, data.seq_len) * global_batch *
                       data.seq_len, start_step)
    logger.record_launch(start_step, resumed is not None, f"TP={parallel.tp_size} x DP={parallel.dp_size}",
                         global_batch)

    dynamics = config.checkpointing.learning_dynamics
    val_sequences = learning_dynamics_val_set(config, eval_dataset) if dynamics.enabled else []
    if dynamics.enabled and len(val_sequences) <= config.model.d_model:
        logger.warn(f"learning dynamics: the val split holds {len(val_sequences)} sequences; pico-analyze's pwcca "
                    f"needs more than d_model={config.model.d_model}")
    tokenizer = load_tokenizer(data.tokenizer) if dynamics.enabled and data.tokenizer else None
    precision = resolve_precision(config)
    if dist.get_rank() == 0:
        print(f"precision {precision}; DeepSpeed bf16 engine: {engine.bfloat16_enabled()}", flush=True)

    def eval_autocast():  # noqa: ANN202
        """bf16-mixed for evaluation, which calls the module directly; in training the engine's forward enters the
        same autocast itself (DeepSpeed's torch_autocast, see deepspeed_config.torch_autocast_section)."""
        return torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def capture_dynamics(step: int) -> None:
        """pico's learning dynamics of `step`: the train split is the batch the next step trains (none past the
        data's end); the val split is the same every time."""
        splits = {"val": val_sequences}
        upcoming = next_global_batch(train_dataset, consumed, global_batch)
        if upcoming is not None:
            splits = {"train": upcoming, **splits}
        save_learning_dynamics(engine.module, fp32_weights(engine), splits,
                               checkpoint_root(config) / f"step_{step}" / "learning_dynamics",
                               dynamics.micro_batch_size, parallel.dp_group, engine.device, tokenizer,
                               probe_precision(dynamics.precision, precision))

    def save_checkpoint(step: int, stopping: bool = False) -> None:
        """Learning dynamics first, then the engine: `latest` moves only once both are on disk. When stopping (a
        signal, a launcher gone) the training state is written alone, within the launcher's grace period; the
        resume captures that step's learning dynamics (same weights, same next batch: the same numbers)."""
        clear_step_directory(config, step)
        if dynamics.enabled and not stopping:
            capture_dynamics(step)
        directory = save_training_checkpoint(engine, config, parallel, step, consumed)
        if dist.get_rank() == 0:
            print(f"checkpoint {directory}: {disk_bytes(directory) / 2**20:,.1f} MiB", flush=True)
            for line in after_checkpoint(checkpoint_root(config)) if after_checkpoint else []:
                print(line, flush=True)
            if publisher is not None:
                publisher.checkpoint_saved()
        dist.barrier()

    def run_eval(step: int) -> None:
        with eval_autocast():
            if config.evaluation.perplexity == "pico":
                perplexity = evaluate_text_perplexity(engine.module, eval_dataset,
                                                      train.micro_batch_size * data.seq_len, parallel, engine.device)
            else:
                perplexity = evaluate_perplexity(engine.module, eval_dataset, train.micro_batch_size, parallel,
                                                 config.evaluation.max_batches, engine.device)
        result.perplexities[step] = perplexity
        logger.log_eval(step, perplexity)

    stop = StopSignal(run_dir)
    engine.train()
    if resumed is None and dynamics.enabled:
        save_checkpoint(0)  # pico keeps the initial model and its learning dynamics as step_0
    elif resumed is not None and dynamics.enabled and not has_learning_dynamics(checkpoint_root(config) / resumed.tag):
        # the launch before stopped at this step without them (or was killed while writing them)
        logger.warn(f"step {start_step}: capturing the learning dynamics the stop left out")
        capture_dynamics(start_step)
        write_manifest(checkpoint_root(config) / resumed.tag, parallel.tp_size)
    if resumed is not None and publisher is not None:
        publisher.checkpoint_saved()  # continue what a killed launch left unpublished
    progress["started"] = True
    logger.start_clock()
    first_step_started, stop_reason = time.perf_counter(), None
    for step in range(start_step + 1, train.max_steps + 1):
        step_loss = torch.zeros((), device=engine.device)  # stays on the device: no host sync in the step
        for _ in range(train.gradient_accumulation_steps):
            input_ids, labels = (t.to(engine.device, non_blocking=True) for t in next(batches))
            loss = engine(input_ids, labels)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach().float()
        consumed += global_batch
        step_loss = _mean_over_dp(step_loss / train.gradient_accumulation_steps, parallel)
        if not engine.was_step_applied():  # DeepSpeed found non-finite gradients and skipped the update
            if train.nan_policy == "stop":
                raise NonFiniteLossError(f"step {step}: loss is {step_loss.item()} and the gradients are not finite; "
                                         f"lower training.lr, set training.gradient_clipping, or "
                                         f"training.nan_policy=skip")
            logger.warn(f"step {step}: non-finite gradients (loss {step_loss.item()}); the update was skipped")
        logger.record_step(step, step_loss, scheduler.get_last_lr()[0], consumed)
        is_last = step == train.max_steps
        evaluating = (config.evaluation.interval and step % config.evaluation.interval == 0) or is_last
        stop_reason = stop.agreed()
        if lock is not None and (trouble := lock.beat()):
            logger.warn(trouble)
        for warning in publisher.poll() if publisher is not None else []:
            logger.warn(warning)
            logger.record_event(step, "publish warning", warning)
        exiting = bool(train.exit_interval) and step % train.exit_interval == 0
        saving = step % config.checkpointing.save_interval == 0 or is_last or exiting or stop_reason is not None
        printing = step % config.logging.log_interval == 0 or is_last or step == start_step + 1
        if printing or evaluating or saving:
            result.losses.update(logger.flush(step, engine.get_global_grad_norm(), printing))
        if step == start_step + 1 and train.compile and dist.get_rank() == 0:
            print(f"torch.compile: the first step took {time.perf_counter() - first_step_started:.1f} s "
                  f"(the decoder blocks compile once, here)", flush=True)
        if stop_reason is not None:  # the training state first; evaluation and learning dynamics can wait
            evaluating = False
        if evaluating:
            run_eval(step)
        if saving:
            save_checkpoint(step, stopping=stop_reason is not None)
        if evaluating or saving:
            logger.start_clock()  # tokens/s counts training steps only
        if stop_reason is not None and not is_last:
            logger.warn(f"step {step}: {stop_reason}; checkpoint of step {step} saved, exiting (rerun the same "
                        f"command to resume)")
            break
        if stop_reason is not None:  # the last step: the run is complete, its final evaluation and dynamics are not
            logger.warn(f"step {step}: {stop_reason} during the last step; its checkpoint is saved without the final "
                        f"evaluation and learning dynamics (rerun the same command to capture the dynamics)")
        if exiting and not is_last:
            logger.warn(f"step {step}: training.exit_interval={train.exit_interval} reached; checkpoint saved, "
                        f"exiting (rerun the same command to resume)")
            break
    stop.restore()
    result.losses.update(logger.flush(None, None, printing=False))
    if publisher is not None:  # after a stop, exit promptly: tools/publish_run.py completes it
        wait = 0.0 if stop_reason is not None else config.checkpointing.hf_checkpoint.wait_at_end_s
        for line in publisher.close(wait):
            print(line, flush=True)
    logger.finish()
    return result


def _mean_over_dp(value: torch.Tensor, parallel: ParallelState) -> torch.Tensor:
    if parallel.dp_size > 1:
        value = value.clone()
        dist.all_reduce(value, group=parallel.dp_group)
        value /= parallel.dp_size
    return value


__all__ = ["NonFiniteLossError", "TrainResult", "check_data_fits_model", "pretrain", "set_schedule_position"]
