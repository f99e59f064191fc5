"""Run a function in N gloo processes (torch.multiprocessing) and collect what rank 0 returns.

The processes are forked from a forkserver that has already imported what a training run imports (torch,
DeepSpeed, torch._dynamo through DeepSpeed's and torch's optimizers, datasets, wandb, megapico's trainer: 4-5 s per
process, paid once per test session instead of at every launch); each one takes the launching process's
environment as it is at the call, as a spawned process would.
"""

import multiprocessing
import os
import sys
import traceback
from multiprocessing import reduction

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megapico.parallel import free_port

PRELOAD = ["torch", "torch._dynamo", "torch._inductor.compile_fx", "deepspeed",
           "deepspeed.runtime.zero.muon.muon_optimizer", "datasets", "wandb", "safetensors.torch",
           "megapico.training.trainer", "distributed"]


class _LaunchersStdio:
    """The launching process's stdout and stderr as they are at the launch (pytest's capture included), sent with
    the process to the forked worker, which would otherwise write to the forkserver's."""

    def __reduce__(self):  # runs while the process is being sent: DupFd then hands the descriptors over with it
        return (_attach_stdio, (reduction.DupFd(1), reduction.DupFd(2)))


def _attach_stdio(stdout, stderr):
    for target, inherited in ((1, stdout), (2, stderr)):
        descriptor = inherited.detach()
        os.dup2(descriptor, target)
        os.close(descriptor)


def _worker(rank, world_size, port, environment, stdio_attached, fn, args, result_path):
    # stdio_attached: None, _LaunchersStdio's work is done while this process is unpickled
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, result_path)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without interpreter teardown, which aborts now and then after the process group is gone
    # (pretrain.py does the same); an exception above still exits through torch's spawn wrapper, which reports it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size, *args, tmp_path):
    """fn(rank, world_size, *args) runs on every rank; rank 0's return value comes back."""
    result_path = os.path.join(tmp_path, f"result_{fn.__name__}.pt")
    multiprocessing.set_forkserver_preload(PRELOAD)  # takes effect when the forkserver first starts
    mp.start_processes(_worker, args=(world_size, free_port(), dict(os.environ), _LaunchersStdio(), fn, args,
                                      result_path),
                       nprocs=world_size, join=True, start_method="forkserver")
    return torch.load(result_path, weights_only=False)


def _unfused_head(x, weight, labels, group, chunk_tokens, compiled, sequence_parallel):
    """pico's loss head as written (TP=1): fp32 logits of every token, then the mean cross-entropy."""
    import torch.nn.functional as F

    assert group is None and not sequence_parallel
    loss = F.cross_entropy(F.linear(x, weight).float(), labels, ignore_index=-100, reduction="sum")
    return loss / (labels != -100).sum().clamp(min=1)


def _inject(fault):
    """Test variants: a NaN loss at the 2nd training forward, a crash inside the 2nd checkpoint save or the 2nd
    manifest write, SIGTERM to rank 1 during step 3, or pico's unfused loss head in place of the fused one."""
    import deepspeed

    from megapico.model import PicoDecoder, pico_decoder

    if fault == "sigterm_on_rank_1_at_step_3":  # what a cluster does before preemption, to one rank only
        import os
        import signal

        forward, calls = PicoDecoder.forward, []

        def signalling_forward(self, input_ids, labels=None):
            if labels is not None and torch.is_grad_enabled():
                calls.append(1)
                if len(calls) == 3 and os.environ["RANK"] == "1":
                    os.kill(os.getpid(), signal.SIGTERM)
            return forward(self, input_ids, labels)

        PicoDecoder.forward = signalling_forward
    elif fault == "crash_in_second_manifest":
        from megapico.checkpoint import training_state

        write, calls = training_state.write_manifest, []

        def crashing_write(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("killed while writing the manifest")
            return write(*args, **kwargs)

        training_state.write_manifest = crashing_write
    elif fault == "unfused_head":
        pico_decoder.vocab_parallel_linear_cross_entropy = _unfused_head
    elif fault == "nan_at_step_2":
        forward, calls = PicoDecoder.forward, []

        def nan_forward(self, input_ids, labels=None):
            out = forward(self, input_ids, labels)
            if labels is not None and torch.is_grad_enabled():
                calls.append(1)
                if len(calls) == 2:
                    return out * float("nan")
            return out

        PicoDecoder.forward = nan_forward
    elif fault == "crash_in_second_save":
        save, calls = deepspeed.DeepSpeedEngine.save_checkpoint, []

        def crashing_save(self, *args, **kwargs):
            calls.append(1)
            written = save(self, *args, **kwargs)
            if len(calls) == 2:
                raise RuntimeError("killed inside save_checkpoint")
            return written

        deepspeed.DeepSpeedEngine.save_checkpoint = crashing_save


def _train(rank, world_size, overrides, capture, fault=None, config_path=None):
    """Run megapico's pretrain in this process (config_path: a YAML under the overrides); optionally report facts
    about the live engine."""
    from megapico.config import load_config
    from megapico.training import trainer

    if fault:
        _inject(fault)

    engines = []
    build = trainer.build_engine

    def recording_build(config, parallel):
        engine, scheduler = build(config, parallel)
        engines.append(engine)
        return engine, scheduler

    trainer.build_engine = recording_build
    from megapico.convert.retention import retention_hook
    from megapico.publish.background import BackgroundPublisher

    config = load_config(config_path, overrides)  # then what pretrain.py does
    result = trainer.pretrain(config, after_checkpoint=retention_hook(config),
                              publisher=BackgroundPublisher.from_config(config))
    facts = {}
    if capture == "zero_partition":
        optimizer = engines[0].optimizer
        facts = dict(optimizer=type(optimizer).__name__,
                     local=sum(p.numel() for p in optimizer.single_partition_of_fp32_groups),
                     adam=sum(s["exp_avg"].numel() for s in optimizer.optimizer.state.values()),
                     model=sum(p.numel() for p in engines[0].module.parameters()))
    return dict(losses=result.losses, perplexities=result.perplexities, resumed_from=result.resumed_from,
                facts=facts)


def train(world_size, overrides, tmp_path, capture=None, fault=None, config_path=None):
    return run_distributed(_train, world_size, list(overrides), capture, fault, config_path, tmp_path=tmp_path)
