"""Per-GPU memory estimate (weights, gradients, ZeRO-2 optimizer partition, activations with and without
full activation checkpointing) for a megapico config and a GPU count.

    python tools/estimate_memory.py --config examples/pico_tiny_16xA100.yaml --gpus 16
    python tools/estimate_memory.py --table --gpus 16      # tiny..large with the example YAMLs' layouts
"""

import argparse
import sys
from pathlib import Path

from megapico.config import ConfigError, load_config
from megapico.training.deepspeed_config import resolve_precision
from megapico.training.memory_estimate import estimate_run, largest_micro_batch

EXAMPLES = {name: Path(__file__).resolve().parent.parent / "examples" / f"pico_{name}_16xA100.yaml"
            for name in ("tiny", "small", "medium", "large")}


def row(name: str, config_path: str, overrides: list[str], gpus: int) -> str:
    config = load_config(config_path, overrides)
    train = config.training
    tp, precision, sp = config.parallel.tensor_parallel_size, resolve_precision(config, cuda=True), \
        config.parallel.sequence_parallel
    estimate = estimate_run(config, gpus)
    cells = [name, f"{tp} (SP)" if sp and tp > 1 else tp, gpus // tp, train.micro_batch_size,
             f"{estimate.weights:.2f}", f"{estimate.gradients:.2f}",
             f"{estimate.optimizer:.2f}", f"{estimate.activations:.1f}", f"{estimate.activations_checkpointed:.1f}",
             f"{estimate.total:.1f}", f"{estimate.total_checkpointed:.1f}",
             largest_micro_batch(config.model, gpus, tp, config.data.seq_len, precision, sp)]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="megapico YAML")
    parser.add_argument("--gpus", type=int, default=16, help="GPUs of the run (DP = GPUs / TP)")
    parser.add_argument("--table", action="store_true", help="all four pico sizes from examples/")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.micro_batch_size=8")
    args = parser.parse_args(argv)
    print("| model | TP | DP | micro batch | weights GiB | grads GiB | ZeRO-2 optimizer GiB | activations GiB | "
          "activations, full AC GiB | total GiB | total, full AC GiB | largest micro batch without AC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    try:
        if args.table:
            for name, path in EXAMPLES.items():
                print(row(name, str(path), args.overrides, args.gpus))
        else:
            print(row(Path(args.config or "defaults").stem, args.config, args.overrides, args.gpus))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
