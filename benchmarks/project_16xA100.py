"""On paper: pico-decoder tiny..large on 16 x A100 80GB with the example recipes (200k steps x 1024 x 2048).

FLOPs/token from megapico.training.metrics (6N + attention), memory from tools/estimate_memory's model.
MFU cannot be measured without the GPUs, so it is an input: the table shows the hours for a range of MFUs
(small models run far below peak: d_model 96 makes thin, memory-bound matmuls).
    python benchmarks/project_16xA100.py --mfu 0.1 0.25 0.4
"""

import argparse
from pathlib import Path

from megapico.config import load_config
from megapico.training.memory_estimate import estimate_run
from megapico.training.metrics import PEAK_BF16_TFLOPS, flops_per_token

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.1, 0.25, 0.4])
    parser.add_argument("--gpus", type=int, default=16)
    args = parser.parse_args()
    peak = PEAK_BF16_TFLOPS["A100"] * 1e12
    header = " | ".join(f"tok/s @ {m:.0%} | hours @ {m:.0%}" for m in args.mfu)
    print(f"| model | GFLOP/token | tokens | peak GiB/GPU | {header} |")
    print("|---|---|---|---|" + "---|---|" * len(args.mfu))
    for name in ("tiny", "small", "medium", "large"):
        config = load_config(EXAMPLES / f"pico_{name}_16xA100.yaml")
        train = config.training
        tokens = train.max_steps * train.global_batch_size * config.data.seq_len
        per_token = flops_per_token(config.model, config.data.seq_len)
        memory = estimate_run(config, args.gpus)
        cells = []
        for mfu in args.mfu:
            tokens_per_second = args.gpus * peak * mfu / per_token
            cells.append(f"{tokens_per_second / 1e6:.2f}M | {tokens / tokens_per_second / 3600:,.0f}")
        print(f"| {name} | {per_token / 1e9:.3f} | {tokens / 1e9:.0f}B | {memory.total:.1f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
