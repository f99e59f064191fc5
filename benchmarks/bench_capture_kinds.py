"""Time of one learning-dynamics capture by the kinds it computes (capture_learning_dynamics' `kinds`): what an
analysis-only capture costs when its config reads only some of activations, weights and gradients.

One split of random sequences on one process (fp32 probe, CPU, one torch thread), best of `--repeats` per kinds
set, the sets alternating: all three (a checkpoint's capture: forward + backward), activations without gradients
(the layers forward under no_grad, no head), weights alone (no pass).
    python benchmarks/bench_capture_kinds.py --preset tiny --sequences 16 --seq 128 --micro 4 --repeats 3
"""

import argparse
import dataclasses
import time

import numpy as np
import torch

from megapico.config import MODEL_PRESETS
from megapico.model import PicoDecoder
from megapico.training.learning_dynamics import capture_learning_dynamics

KIND_SETS = (("activations", "weights", "gradients"), ("activations", "weights"), ("activations",), ("weights",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = dataclasses.replace(MODEL_PRESETS[args.preset], max_seq_len=args.seq)
    torch.manual_seed(42)
    model = PicoDecoder(config)
    samples = np.random.default_rng(0).integers(0, config.vocab_size, (args.sequences, args.seq + 1))
    capture_learning_dynamics(model, samples[:1, :3], 1)  # the probe's one-time imports, outside the timings
    seconds = {kinds: [] for kinds in KIND_SETS}
    for _ in range(args.repeats):
        for kinds in KIND_SETS:
            started = time.perf_counter()
            capture_learning_dynamics(model, samples, args.micro, kinds=kinds)
            seconds[kinds].append(time.perf_counter() - started)
    full = min(seconds[KIND_SETS[0]])
    print(f"{args.preset}, {args.sequences} x {args.seq} tokens, micro {args.micro}, fp32 CPU, 1 thread, "
          f"best of {args.repeats}")
    for kinds, times in seconds.items():
        print(f"{' + '.join(kinds):36s} {min(times):6.2f} s ({min(times) / full:.2f} of all three)   "
              f"[{', '.join(f'{t:.2f}' for t in times)}]")


if __name__ == "__main__":
    main()
