"""The pretraining loop, readable top to bottom: set up (data, the analysis checked, engine) -> resume -> steps,
each ending with logging, learning-dynamics captures (megapico/training/captures.py), eval and checkpoints.

Parallel layout: TP ranks split every layer (megapico.parallel); DeepSpeed ZeRO-2 shards gradients and the
fp32 master weights + Adam state over the data-parallel group only (it learns the groups from `mpu`).
"""

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from megapico.checkpoint.manifest import MANIFEST, disk_bytes, write_manifest
from megapico.checkpoint.paths import CheckpointError, refuse_links
from megapico.checkpoint.run_lock import STALE_S, RunLock, RunLockedError, wait_until_free
from megapico.checkpoint.training_state import (
    agreed_resume_point,
    checkpoint_root,
    clear_step_directory,
    continue_the_saved_run,
    fresh_start_over_unfinished,
    has_learning_dynamics,
    save_training_checkpoint,
    step_of,
    unfinished_checkpoints,
)
from megapico.config import MegapicoConfig, config_to_yaml, save_config, validate_config
from megapico.data.sampler import PretrainingSampler, collate_samples
from megapico.parallel import ParallelState, init_distributed
from megapico.training.captures import Captures, check_learning_dynamics, learning_dynamics_val_set
from megapico.training.deepspeed_config import resolve_precision
from megapico.training.engine import build_engine, resume_engine, set_schedule_position
from megapico.training.evaluation import evaluate_perplexity, evaluate_text_perplexity
from megapico.training.logger import RunLogger
from megapico.training.metrics import flops_per_token
from megapico.training.preemption import StopSignal
from megapico.training.run_data import build_eval_dataset, build_run_data, check_data_fits_model


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


def _hold_run_directory(run_dir: Path, stale_s: float) -> RunLock | None:
    """Rank 0 takes the run directory's lock; every rank raises the same RunLockedError when a live run holds it
    (one that took it since every rank looked, before the rendezvous)."""
    lock, outcome = None, [None]
    if dist.get_rank() == 0:
        lock = RunLock(run_dir, stale_s)
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
    again if the start fails before the first step. Every rank reads its lock before the rendezvous, where the same
    command given twice would meet the live run's port: a live run refuses the launch in one line, one saving after
    a stop is waited for."""
    run_dir = Path(config.checkpointing.runs_dir) / config.checkpointing.run_name
    hub = config.checkpointing.hf_checkpoint  # the end of a run may wait that long for uploads, without beats
    stale_s = STALE_S + (hub.wait_at_end_s if config.checkpointing.save_to_hf else 0.0)
    init_distributed(before_rendezvous=lambda rank: wait_until_free(run_dir, stale_s, rank))
    validate_config(config, world_size=dist.get_world_size(), batch=False)  # whole once the resume point is known
    parallel = ParallelState.build(config.parallel.tensor_parallel_size)
    created = not run_dir.exists()
    lock = _hold_run_directory(run_dir, stale_s)
    resume, root = config.checkpointing.resume, checkpoint_root(config)
    if dist.get_rank() == 0 and resume.startswith("step_") and (root / resume).is_dir():
        later = sorted((path.name for path in root.glob("step_*") if step_of(path.name) > step_of(resume)
                        and (path / MANIFEST).is_file()), key=step_of)  # complete ones: a half-written one is not kept
        if later:
            print(f"warning: checkpointing.resume={resume}, and {root} holds later checkpoints ({', '.join(later)}): "
                  f"this run replaces each of them when it saves that step again (move them away to keep them)",
                  flush=True)
    progress = {"started": False}
    publisher = publisher if dist.get_rank() == 0 else None
    try:
        result = _pretrain(config, parallel, run_dir, lock, progress, after_checkpoint, publisher)
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
    if dist.get_rank() == 0 and result.resumed_from is not None and result.resumed_from >= config.training.max_steps:
        print(f"{run_dir}: step {result.resumed_from} of training.max_steps={config.training.max_steps} was trained "
              f"already; nothing left to train (to train on, raise training.max_steps with "
              f"training.change_schedule_on_resume=true)", flush=True)
    return result


def _pretrain(config: MegapicoConfig, parallel: ParallelState, run_dir: Path, lock: RunLock | None,
              progress: dict, after_checkpoint: Callable[[Path], list[str]] | None,
              publisher: CheckpointPublisher | None) -> TrainResult:
    train, dynamics, root = config.training, config.checkpointing.learning_dynamics, checkpoint_root(config)
    unfinished = unfinished_checkpoints(config)
    point = agreed_resume_point(config)
    if point is None:  # a stop cut the saves short before any finished: the same command starts afresh
        fresh_start_over_unfinished(config, unfinished)
    for path in unfinished if point is not None and dist.get_rank() == 0 else []:
        print(f"warning: {path}: a half-written checkpoint (no manifest.json: its save did not finish); it "
              f"is not resumed from, and is replaced when its step is saved again", flush=True)
    lines = continue_the_saved_run(config, point, parallel.dp_size) if point is not None else []
    validate_config(config, world_size=dist.get_world_size())
    for line in lines if dist.get_rank() == 0 else []:
        print(f"resume: {line}", flush=True)
    if dist.get_rank() == 0:
        print(config_to_yaml(config), flush=True)
        save_config(config, run_dir / "config.yaml")
    data = build_run_data(config, parallel.dp_size, run_dir)
    val_sequences = learning_dynamics_val_set(config, data.eval) if dynamics.enabled else []
    analysis = check_learning_dynamics(config, len(val_sequences), data.global_batch)  # before any step trains

    engine, scheduler = build_engine(config, parallel)
    resumed = resume_engine(engine, scheduler, config, parallel, point)
    start_step, consumed = (resumed.step, resumed.consumed_samples) if resumed else (0, 0)
    result = TrainResult(run_dir=run_dir, resumed_from=resumed.step if resumed else None)
    sampler = PretrainingSampler(len(data.train), consumed, train.micro_batch_size, parallel.dp_rank,
                                 parallel.dp_size)
    batches = iter(DataLoader(data.train, batch_sampler=sampler, collate_fn=collate_samples,
                              pin_memory=torch.cuda.is_available()))
    logger = RunLogger(config, run_dir, parallel, flops_per_token(config.model, config.data.seq_len) *
                       data.global_batch * config.data.seq_len, start_step)
    logger.record_launch(start_step, resumed is not None, f"TP={parallel.tp_size} x DP={parallel.dp_size}",
                         data.global_batch)
    precision = resolve_precision(config)
    if dist.get_rank() == 0:
        print(f"precision {precision}; DeepSpeed bf16 engine: {engine.bfloat16_enabled()}", flush=True)
    captures = Captures(config, engine, parallel, data, val_sequences, analysis, precision, run_dir, logger)

    def save_checkpoint(step: int, stopping: bool = False) -> None:
        """Learning dynamics first, then the engine: `latest` moves only once both are on disk. When stopping (a
        signal, a launcher gone) the training state is written alone, within the launcher's grace period; the
        resume captures that step's learning dynamics (same weights, same next batch: the same numbers)."""
        clear_step_directory(config, step)
        if dynamics.enabled and not stopping:
            captures.capture(step, consumed, root / f"step_{step}")
        directory = save_training_checkpoint(engine, config, parallel, step, consumed)
        if dist.get_rank() == 0:
            print(f"checkpoint {directory}: {disk_bytes(directory) / 2**20:,.1f} MiB", flush=True)
            for line in after_checkpoint(root) if after_checkpoint else []:
                print(line, flush=True)
            if publisher is not None:
                publisher.checkpoint_saved()
        dist.barrier()

    def run_eval(step: int) -> None:
        """bf16-mixed for evaluation, which calls the module directly; in training the engine's forward enters the
        same autocast itself (DeepSpeed's torch_autocast, see deepspeed_config.torch_autocast_section)."""
        with torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            if config.evaluation.perplexity == "pico":
                perplexity = evaluate_text_perplexity(engine.module, data.eval,
                                                      train.micro_batch_size * config.data.seq_len, parallel,
                                                      config.evaluation.max_sequences, engine.device)
            else:
                perplexity = evaluate_perplexity(engine.module, data.eval, train.micro_batch_size, parallel,
                                                 config.evaluation.max_sequences, engine.device)
        result.perplexities[step] = perplexity
        logger.log_eval(step, perplexity)

    stop = StopSignal(run_dir)
    engine.train()
    if resumed is None and dynamics.enabled:
        save_checkpoint(0)  # pico keeps the initial model and its learning dynamics as step_0
    elif resumed is not None and dynamics.enabled and not has_learning_dynamics(root / resumed.tag):
        # the launch before stopped at this step without them (or was killed while writing them)
        logger.warn(f"step {start_step}: capturing the learning dynamics the stop left out")
        captures.capture(start_step, consumed, root / resumed.tag)
        write_manifest(root / resumed.tag, parallel.tp_size)
    elif resumed is not None and dynamics.enabled:
        captures.resubmit(start_step, root / resumed.tag)  # what a killed launch's analysis left out
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
        consumed += data.global_batch
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
        captures.poll()
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
        capturing = not saving and stop_reason is None and captures.due(step)  # a checkpoint's capture serves too
        if capturing:
            captures.capture(step, consumed)
        if evaluating:
            run_eval(step)
        if saving:
            save_checkpoint(step, stopping=stop_reason is not None)
        if capturing or evaluating or saving:
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
    if lock is not None:
        lock.beat()  # the analysis may take learning_dynamics.wait_at_end_s without beats
    captures.close(stopping=stop_reason is not None)  # after a stop, exit promptly: the next launch completes it
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


__all__ = ["NonFiniteLossError", "TrainResult", "build_engine", "build_eval_dataset", "check_data_fits_model",
           "pretrain", "set_schedule_position"]
