"""pretrain.py's training step against pico-train's, side by side in one run (issue 11's goals).

megapico: the DeepSpeed engine `pretrain.py` builds (one process, ZeRO-2, fp32 on CPU) with the fused chunked
loss head, eager and with `training.compile=true`. pico-train: its own PicoDecoder (src/model/pico_decoder.py of a
pico-train checkout, loaded from --pico-train, not shipped here) + F.cross_entropy over its fp32 logits + AdamW,
the step its Lightning loop runs. Same model size, batch, data and thread count.

Also: bytes autograd saves for backward (saved_tensors_hooks, each storage once) and the largest saved tensor
against the full fp32 logits; and per-rank saved bytes at TP=2 and TP=4 with and without sequence
parallelism.
    python benchmarks/bench_step.py --pico-train ../pico-train --preset tiny --micro-batch 4 --seq 512 --steps 5
"""

import dataclasses
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from distributed import run_distributed  # noqa: E402
from host import cpu_run_settings  # noqa: E402
from step_peers import load_pico_train_model, pretrain_engine, step_arguments  # noqa: E402

from megapico.config import MODEL_PRESETS  # noqa: E402
from megapico.model import PicoDecoder  # noqa: E402
from megapico.training.memory_estimate import saved_for_backward  # noqa: E402


def timed_steps(step, steps):
    step()  # warm-up (and compilation)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def _tp_saved_bytes(rank, world_size, preset, micro_batch, seq, sequence_parallel):
    from megapico.parallel import ParallelState

    state = ParallelState.build(world_size)
    config = dataclasses.replace(MODEL_PRESETS[preset], max_seq_len=seq)
    torch.manual_seed(42)
    model = PicoDecoder(config, state.tp_group, sequence_parallel=sequence_parallel)
    tokens = torch.randint(0, config.vocab_size, (micro_batch, seq + 1), generator=torch.Generator().manual_seed(0))
    return saved_for_backward(lambda: model(tokens[:, :-1], tokens[:, 1:]), model.parameters())[0]


def main():
    parser = step_arguments(__doc__, micro_batch=4, seq=512, steps=5)
    args = parser.parse_args()
    config = dataclasses.replace(MODEL_PRESETS[args.preset], max_seq_len=args.seq)
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq + 1),
                           generator=torch.Generator().manual_seed(0))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    batch_tokens = inputs.numel()
    print(f"preset={args.preset} micro_batch={args.micro_batch} seq={args.seq} fp32 CPU {cpu_run_settings()}")

    peer = load_pico_train_model(args.pico_train, config)
    peer_optimizer = torch.optim.AdamW(peer.parameters(), lr=3e-4, weight_decay=0.01)

    def peer_loss():
        logits, _ = peer(inputs)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))

    def peer_step():
        peer_loss().backward()
        peer_optimizer.step()
        peer_optimizer.zero_grad(set_to_none=True)

    results = {"pico-train (PicoDecoder + F.cross_entropy + AdamW)": timed_steps(peer_step, args.steps)}
    for compile_blocks in (False, True):
        engine = pretrain_engine(args.preset, args.seq, args.micro_batch, "fp32", "ds_configs/zero2_cpu.json",
                                 compile_blocks)

        def engine_step(engine=engine):
            engine.backward(engine(inputs, labels))
            engine.step()

        started = time.perf_counter()
        engine_step()
        first = time.perf_counter() - started
        name = f"megapico pretrain.py step ({'compile' if compile_blocks else 'eager'})"
        results[name] = timed_steps(engine_step, args.steps)
        if compile_blocks:
            print(f"compile: first step {first:.1f} s")
    base = results["pico-train (PicoDecoder + F.cross_entropy + AdamW)"]
    print("\n| training step | s/step | tokens/s | vs pico-train |\n|---|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {batch_tokens / seconds:,.0f} | {base / seconds:.2f}x |")

    torch.manual_seed(42)
    ours_model = PicoDecoder(config)
    logits_bytes = batch_tokens * config.vocab_size * 4
    print("\n| saved for backward (no activation checkpointing) | total MiB | largest tensor MiB | vs full fp32 "
          "logits |\n|---|---|---|---|")
    for precision in ("fp32", "bf16-mixed"):  # bf16-mixed: CPU autocast, what a GPU run's autocast keeps
        def saved(model, loss_fn, precision=precision):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                return saved_for_backward(loss_fn, model.parameters())

        theirs = saved(peer, peer_loss)
        ours = saved(ours_model, lambda: ours_model(inputs, labels))
        for name, (total, largest) in ((f"pico-train, {precision}", theirs), (f"megapico, {precision}", ours)):
            print(f"| {name} | {total / 2**20:,.1f} | {largest / 2**20:,.1f} | {logits_bytes / largest:.1f}x smaller |")
        print(f"{precision}: megapico saves {theirs[0] / ours[0]:.2f}x fewer bytes than pico-train")

    for tp in (2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            per_rank = {sp: run_distributed(_tp_saved_bytes, tp, args.preset, args.micro_batch, args.seq, sp,
                                            tmp_path=tmp) for sp in (False, True)}
        print(f"TP={tp} per-rank saved bytes: {per_rank[False] / 2**20:,.1f} MiB without SP, "
              f"{per_rank[True] / 2**20:,.1f} MiB with SP ({per_rank[True] / per_rank[False]:.2f}x)")


if __name__ == "__main__":
    main()
