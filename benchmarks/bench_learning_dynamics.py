"""Time and peak memory of the learning-dynamics capture against training forward+backward over the same tokens.

Issue 10's goal: the capture's time within ~2x of a training forward + backward of the same sequences, its extra
memory O(kept rows + one micro batch). Both run in one process on the same model (fp32, CPU, one thread).
    python benchmarks/bench_learning_dynamics.py --preset tiny --sequences 64 --seq 512 --micro 8
"""

import argparse
import dataclasses
import resource
import time

import numpy as np
import psutil
import torch

from megapico.config import MODEL_PRESETS
from megapico.model import PicoDecoder
from megapico.training.learning_dynamics import capture_learning_dynamics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = dataclasses.replace(MODEL_PRESETS[args.preset], max_seq_len=args.seq)
    torch.manual_seed(42)
    model = PicoDecoder(config)
    samples = np.random.default_rng(0).integers(0, config.vocab_size, (args.sequences, args.seq + 1))
    with torch.device("meta"):
        PicoDecoder(config)  # the probe's one-time meta-device imports, outside both measurements
    process = psutil.Process()

    started, base = time.perf_counter(), process.memory_info().rss
    for start in range(0, args.sequences, args.micro):
        tokens = torch.from_numpy(samples[start:start + args.micro]).long()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    train_seconds = time.perf_counter() - started
    train_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.zero_grad(set_to_none=True)

    started = time.perf_counter()
    capture_learning_dynamics(model, samples, args.micro)
    capture_seconds = time.perf_counter() - started
    capture_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{args.preset}, {args.sequences} x {args.seq} tokens, micro {args.micro}, fp32 CPU, 1 thread")
    print(f"training fwd+bwd: {train_seconds:.2f} s, peak RSS {train_peak / 2**20:,.0f} MiB "
          f"(+{(train_peak - base) / 2**20:,.0f} over the model)")
    print(f"capture:          {capture_seconds:.2f} s ({capture_seconds / train_seconds:.2f}x), peak RSS "
          f"{capture_peak / 2**20:,.0f} MiB (+{max(0, capture_peak - train_peak) / 2**20:,.0f} over training's)")


if __name__ == "__main__":
    main()
