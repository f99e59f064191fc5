"""Steps per second of a CPU training loop with the off-path analysis (megapico/training/analysis_runner.py) on vs
off: what the background analysis costs the training path.

Both arms train the same model (megapico's PicoDecoder, AdamW, one process, fp32) and take a learning-dynamics
capture every `--every` steps (capture_learning_dynamics on the val sequences): the capture's own cost is
benchmarks/bench_learning_dynamics.py's, the same in both arms. The `on` arm also submits each capture to an
AnalysisRunner and polls it every step; the worker then computes the spec below (cka against the arm's last
capture with its ov_circuit heads, condition_number, per and the frobenius norm on weights and gradients of every
layer) in its own niced process while the loop trains. Arms alternate, best of `--repeats` each; each `on` arm
starts its runner (and waits for its first result, so the worker's start-up is outside the timing) and closes it
after the timing, reporting how long the worker still needed then (its backlog: 0 when it keeps up).
Usage: python benchmarks/bench_analysis_overhead.py [--preset tiny] [--steps 20] [--every 2] [--repeats 3]
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import cpu_run_settings  # noqa: E402

from megapico.analysis import analyze  # noqa: E402
from megapico.analysis.spec import AnalysisSpec, parse_analysis  # noqa: E402
from megapico.config import MODEL_PRESETS, ModelConfig  # noqa: E402
from megapico.model import PicoDecoder  # noqa: E402
from megapico.training.analysis_runner import AnalysisRunner  # noqa: E402
from megapico.training.analysis_worker import WORKER_THREADS  # noqa: E402
from megapico.training.learning_dynamics import capture_learning_dynamics  # noqa: E402


def spec_for(model: ModelConfig, target: int) -> AnalysisSpec:
    layers = list(range(model.n_layers))
    simple = [{"component_name": "simple", "data_type": kind, "layer_suffixes": suffix, "layers": layers}
              for kind in ("weights", "gradients") for suffix in ("swiglu.w_2", "attention.v_proj")]
    return parse_analysis({"analysis_name": "overhead", "metrics": [
        {"metric_name": "cka", "data_split": "val", "target_checkpoint": target, "components": [
            {"component_name": "simple", "data_type": "activations", "layer_suffixes": "swiglu.w_2", "layers": layers},
            {"component_name": "ov_circuit", "data_type": "activations", "layers": layers,
             "layer_suffixes": {"value_layer": "attention.v_proj", "output_layer": "attention.o_proj"}}]},
        {"metric_name": "condition_number", "data_split": "val", "components": simple},
        {"metric_name": "per", "data_split": "val", "components": simple},
        {"metric_name": "norm", "data_split": "val", "norm_type": "frobenius", "components": simple},
    ]}, "bench")


def arm(model: PicoDecoder, batches: list, val: list, args, runner: AnalysisRunner | None  # noqa: ANN001
        ) -> tuple[float, float]:
    """(seconds for the steps, seconds inside submit and poll)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    overhead = 0.0
    started = time.perf_counter()
    for step, tokens in enumerate(batches, start=1):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.every == 0:
            dynamics = {"val": capture_learning_dynamics(model, val, args.micro)}
            if runner is not None:
                before = time.perf_counter()
                runner.submit(step, dynamics)
                overhead += time.perf_counter() - before
        if runner is not None:
            before = time.perf_counter()
            runner.poll()
            overhead += time.perf_counter() - before
    return time.perf_counter() - started, overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=64, help="val sequences per capture")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="the training loop's torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = dataclasses.replace(MODEL_PRESETS[args.preset], max_seq_len=args.seq)
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, config.vocab_size, (args.micro, args.seq + 1))).long()
               for _ in range(args.steps)]
    val = list(rng.integers(0, config.vocab_size, (args.sequences, args.seq + 1)))
    target = args.steps - args.steps % args.every
    spec = spec_for(config, target)
    torch.manual_seed(42)
    initial = PicoDecoder(config).state_dict()

    probe = PicoDecoder(config)  # one capture, for the analysis's own time and the imports' first use
    sample = {"val": capture_learning_dynamics(probe, val, args.micro)}
    started = time.perf_counter()
    analyze(spec, target, sample, {target: sample}, config)
    analysis_s = time.perf_counter() - started

    times: dict[str, list[float]] = {"off": [], "on": []}
    overheads, backlogs = [], []
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            for name in ("off", "on"):
                model = PicoDecoder(config)
                model.load_state_dict(initial)
                runner = None
                if name == "on":
                    runner = AnalysisRunner(spec, Path(work) / f"run{repeat}", config)
                    runner.submit(0, sample)  # the worker's start-up and first analysis, outside the timing
                    while not runner.poll():
                        time.sleep(0.05)
                seconds, overhead = arm(model, batches, val, args, runner)
                times[name].append(seconds)
                if runner is not None:
                    overheads.append(overhead)
                    before = time.perf_counter()
                    runner.close(600)
                    backlogs.append(time.perf_counter() - before)
    off, on = min(times["off"]), min(times["on"])
    captures = args.steps // args.every
    print(f"{args.preset}, micro {args.micro} x {args.seq} tokens, {args.steps} steps, a capture of {args.sequences} "
          f"val sequences every {args.every}; {cpu_run_settings()}; worker {WORKER_THREADS} thread(s), niced")
    print(f"analysis of one capture (in-process, direct analyze): {analysis_s:.2f} s")
    print(f"off: {args.steps / off:.3f} steps/s (arms: {', '.join(f'{t:.2f}' for t in times['off'])} s)")
    print(f"on:  {args.steps / on:.3f} steps/s (arms: {', '.join(f'{t:.2f}' for t in times['on'])} s)")
    print(f"on/off steps per second: {off / on:.3f}; submit + poll: {min(overheads) / captures * 1e3:.1f} ms per "
          f"capture; worker still busy at the arm's end: {', '.join(f'{b:.2f}' for b in backlogs)} s")


if __name__ == "__main__":
    main()
