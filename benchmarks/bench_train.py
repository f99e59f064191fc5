"""Training-step figures on CPU: activation checkpointing and ZeRO-2.

1. Activation memory = bytes of the tensors autograd saves for backward (counted with saved_tensors_hooks,
   each storage once), and fwd+bwd step time, for activation checkpointing none / selective / full.
2. The real DeepSpeed engine (gloo, fp32) at DP=1 and DP=2 with ZeRO-2: tokens/s per optimizer step, peak RSS,
   and the bytes of fp32 master weights + Adam moments each rank holds.
    python benchmarks/bench_train.py --preset tiny --micro-batch 4 --seq 256 --steps 4
"""

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from distributed import run_distributed  # noqa: E402
from host import cpu_run_settings  # noqa: E402

from megapico.config import MODEL_PRESETS, ActivationCheckpointingConfig  # noqa: E402
from megapico.model import PicoDecoder  # noqa: E402
from megapico.training.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from megapico.training.memory_estimate import saved_for_backward  # noqa: E402


def step_seconds(model, input_ids, labels, repeats):
    model(input_ids, labels).backward()
    start = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        model(input_ids, labels).backward()
    return (time.perf_counter() - start) / repeats


def activation_checkpointing_table(config, micro_batch, seq, repeats):
    input_ids = torch.randint(0, config.vocab_size, (micro_batch, seq))
    labels = torch.randint(0, config.vocab_size, (micro_batch, seq))
    rows = {}
    for mode in ("none", "selective", "full"):
        torch.manual_seed(42)
        model = PicoDecoder(config)
        apply_activation_checkpointing(model, ActivationCheckpointingConfig(mode=mode))
        saved, _ = saved_for_backward(lambda model=model: model(input_ids, labels), model.parameters())
        rows[mode] = (saved, step_seconds(model, input_ids, labels, repeats))
    base_bytes, base_time = rows["none"]
    for mode, (nbytes, seconds) in rows.items():
        print(f"AC {mode:9s}: activations {nbytes / 2**20:8.1f} MiB ({base_bytes / nbytes:.2f}x less) | step "
              f"{seconds:.3f}s ({seconds / base_time:.2f}x time)")


def _engine_run(rank, world_size, preset, micro_batch, seq, steps):
    import resource

    import deepspeed

    from megapico.parallel import ParallelState

    state = ParallelState.build(1)
    config = dataclasses.replace(MODEL_PRESETS[preset], max_seq_len=seq)
    torch.manual_seed(42)
    model = PicoDecoder(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
          "train_batch_size": micro_batch * world_size, "zero_optimization": {"stage": 2}, "gradient_clipping": 0.0,
          "steps_per_print": 2**31 - 1}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, mpu=state)
    data = torch.randint(0, config.vocab_size, (steps + 1, micro_batch, seq + 1))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = engine(data[step, :, :-1], data[step, :, 1:])
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
    optimizer_bytes = sum(4 * p.numel() * 3 for p in engine.optimizer.single_partition_of_fp32_groups)
    rows = [None] * world_size
    torch.distributed.all_gather_object(rows, (optimizer_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    tokens = micro_batch * world_size * seq
    return dict(tokens_per_second=tokens / (sum(times[1:]) / steps), per_rank=rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    config = dataclasses.replace(MODEL_PRESETS[args.preset], max_seq_len=args.seq)
    print(f"preset={args.preset} micro_batch={args.micro_batch} seq={args.seq} {cpu_run_settings()}")
    activation_checkpointing_table(config, args.micro_batch, args.seq, args.steps)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for world_size in (1, 2):
            result = run_distributed(_engine_run, world_size, args.preset, args.micro_batch, args.seq, args.steps,
                                     tmp_path=tmp)
            optimizer_mib = [b / 2**20 for b, _ in result["per_rank"]]
            rss = [kb / 2**10 for _, kb in result["per_rank"]]
            print(f"ZeRO-2 DP={world_size}: {result['tokens_per_second']:,.0f} tok/s (global batch "
                  f"{args.micro_batch * world_size}) | fp32 master + Adam per rank "
                  f"{', '.join(f'{m:.1f}' for m in optimizer_mib)} MiB | peak RSS per rank "
                  f"{', '.join(f'{r:.0f}' for r in rss)} MiB")


if __name__ == "__main__":
    main()
