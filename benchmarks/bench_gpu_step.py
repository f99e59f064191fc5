"""pretrain.py's training step against pico-train's on one GPU in bf16: issue 11 on its real target.

Each case runs in its own process (clean peak-memory figures; an out-of-memory case is reported, not fatal):
- pico-train: its PicoDecoder (src/model/pico_decoder.py of a pico-train checkout, --pico-train) with fp32 weights
  under torch.autocast(bf16) (what Lightning Fabric's bf16-mixed does), F.cross_entropy over its fp32 logits, and
  torch.optim.AdamW: the step its trainer runs.
- megapico eager / compile: the DeepSpeed engine pretrain.py builds (build_engine: ZeRO-2, ds_configs/zero2_a100.json,
  training.precision=bf16-mixed, the fused chunked loss head), with and without training.compile.
- the loss head alone, over [micro x seq, d_model] bf16 hidden states: unfused (F.linear + fp32 F.cross_entropy),
  megapico's fused head with the gradients computed in the forward (eager / compiled kernels), and the same head with
  the logits recomputed in backward instead (torch.utils.checkpoint around each chunk's linear + cross-entropy).
Figures: seconds per step, tokens/s, MFU (megapico.training.metrics), peak CUDA memory in the steady state.
    python benchmarks/bench_gpu_step.py --pico-train ../pico-train --preset tiny --micro-batch 16 --seq 2048
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from step_peers import load_pico_train_model, pretrain_engine, step_arguments  # noqa: E402

from megapico.config import MODEL_PRESETS
from megapico.parallel.cross_entropy import vocab_parallel_linear_cross_entropy
from megapico.training.metrics import flops_per_token, peak_tflops_per_device

STEP_CASES = ("pico-train", "megapico-eager", "megapico-compile")
HEAD_CASES = ("head-unfused", "head-fused-eager", "head-fused-compiled", "head-recompute-in-backward")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, steps: int, warmup: int = 2) -> dict:  # noqa: ANN001
    """Seconds per step after `warmup` steps (compilation included there), and the steady-state peak memory."""
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize()
    first = time.perf_counter() - started
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"seconds": seconds, "warmup_seconds": first, "peak_gib": peak}


def pico_train_step(args, config, inputs, labels, device):  # noqa: ANN001, ANN201
    model = load_pico_train_model(args.pico_train, config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def step():  # noqa: ANN202
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits, _ = model(inputs)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def megapico_step(args, inputs, labels, compile_blocks: bool):  # noqa: ANN001, ANN201
    engine = pretrain_engine(args.preset, args.seq, args.micro_batch, "bf16-mixed", "ds_configs/zero2_a100.json",
                             compile_blocks)

    def step():  # noqa: ANN202
        loss = engine(inputs, labels)  # the engine enters bf16 autocast itself (DeepSpeed's torch_autocast)
        engine.backward(loss)
        engine.step()
    return step


def head_step(case: str, config, hidden, labels, device, chunk_tokens: int = 1024):  # noqa: ANN001, ANN201
    """One loss head forward + backward over bf16 hidden states with an fp32 weight, as under bf16-mixed."""
    torch.manual_seed(0)
    weight = (torch.randn(config.vocab_size, config.d_model, device=device) * 0.02).requires_grad_()
    x = hidden.detach().requires_grad_()
    flat_labels = labels.reshape(-1)

    def chunk_loss_sum(x_c, weight, labels_c):  # noqa: ANN001, ANN202
        logits = F.linear(x_c, weight.to(x_c.dtype)).float()
        return F.cross_entropy(logits, labels_c, reduction="sum")

    def loss():  # noqa: ANN202
        if case == "head-unfused":
            return chunk_loss_sum(x, weight, flat_labels) / flat_labels.numel()
        if case == "head-recompute-in-backward":
            total = sum(checkpoint(chunk_loss_sum, x[start:start + chunk_tokens], weight,
                                   flat_labels[start:start + chunk_tokens], use_reentrant=False)
                        for start in range(0, x.shape[0], chunk_tokens))
            return total / flat_labels.numel()
        return vocab_parallel_linear_cross_entropy(x, weight, flat_labels, chunk_tokens=chunk_tokens,
                                                   compiled=case == "head-fused-compiled")

    def step():  # noqa: ANN202
        loss().backward()
        x.grad = weight.grad = None
    return step


def run_case(args) -> dict:  # noqa: ANN001
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dataclasses.replace(MODEL_PRESETS[args.preset], max_seq_len=args.seq)
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq + 1), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if args.case == "pico-train":
        step = pico_train_step(args, config, inputs, labels, device)
    elif args.case.startswith("megapico"):
        step = megapico_step(args, inputs, labels, compile_blocks=args.case == "megapico-compile")
    else:
        hidden = torch.randn(inputs.numel(), config.d_model, device=device, dtype=torch.bfloat16)
        step = head_step(args.case, config, hidden, labels, device)
    return timed(step, args.steps)


def main() -> None:
    parser = step_arguments(__doc__, micro_batch=16, seq=2048, steps=20)
    parser.add_argument("--cases", nargs="+", default=[*STEP_CASES, *HEAD_CASES],
                        choices=[*STEP_CASES, *HEAD_CASES])
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)), flush=True)
        return

    config = dataclasses.replace(MODEL_PRESETS[args.preset], max_seq_len=args.seq)
    batch_tokens = args.micro_batch * args.seq
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}: {args.preset}, micro batch {args.micro_batch} x seq {args.seq} "
          f"= {batch_tokens:,} tokens, {args.steps} timed steps after 2 warm-up steps")
    peak_tflops = peak_tflops_per_device()
    results = {}
    for case in args.cases:
        child = subprocess.run([sys.executable, __file__, "--case", case, "--pico-train", args.pico_train,
                                "--preset", args.preset, "--micro-batch", str(args.micro_batch), "--seq",
                                str(args.seq), "--steps", str(args.steps)], capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
        if child.returncode or not lines:
            tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
            results[case] = {"error": "out of memory" if "OutOfMemoryError" in child.stderr else tail[:160]}
        else:
            results[case] = json.loads(lines[-1])
        print(f"{case}: {results[case]}", flush=True)

    for title, cases, base in (("training step", STEP_CASES, "pico-train"),
                               ("loss head fwd+bwd", HEAD_CASES, "head-unfused")):
        print(f"\n| {title} | s/step | tokens/s | MFU | vs {base} | steady-state peak GiB | first 2 steps s |")
        print("|---|---|---|---|---|---|---|")
        for case in (c for c in cases if c in results):
            result = results[case]
            if "error" in result:
                print(f"| {case} | {result['error']} | | | | | |")
                continue
            seconds = result["seconds"]
            mfu = (f"{flops_per_token(config, args.seq) * batch_tokens / seconds / (peak_tflops * 1e12):.1%}"
                   if peak_tflops and title == "training step" else "")
            speedup = (f"{results[base]['seconds'] / seconds:.2f}x" if "seconds" in results.get(base, {}) else "")
            print(f"| {case} | {seconds:.4f} | {batch_tokens / seconds:,.0f} | {mfu} | {speedup} | "
                  f"{result['peak_gib']:.2f} | {result['warmup_seconds']:.1f} |")


if __name__ == "__main__":
    main()
