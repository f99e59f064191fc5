"""Continue a pico-train run with megapico: its checkpoint (HF files + fabric_state/) -> runs/RUN/checkpoints/step_N.

    hf download pico-lm/pico-decoder-tiny --local-dir pico-decoder-tiny      # main: step 125,000
    python tools/convert_from_pico_train.py pico-decoder-tiny --output runs/pico-decoder-tiny \\
        --config examples/pico_tiny_16xA100.yaml
    bash examples/pico_tiny_16xA100.sh examples/pico_tiny_16xA100.yaml checkpointing.run_name=pico-decoder-tiny \\
        training.precision=lightning-deepspeed-bf16                                        # resumes at step 125,000
Reads the one-device fabric_state/checkpoint.pt and Lightning's DeepSpeed ZeRO-2 fabric_state/ of any number of
ranks; writes weights, fp32 masters, Adam moments and step, the LR-schedule position and the consumed rows (step x
pico's global batch), verified by reading them back. The model section comes from the checkpoint's config.json
unless --config names a model_preset (then they must agree); the recipe's global batch and AdamW hyperparameters
must be pico's. Bad input is one line naming the file, and nothing is written.
"""

import argparse
import sys
from pathlib import Path

from megapico.config import ConfigError, load_config
from megapico.convert.checkpoint_reader import CheckpointError
from megapico.convert.from_pico_train import pico_train_to_megapico


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a pico-train checkpoint directory (config.json, model.safetensors, "
                                           "fabric_state/)")
    parser.add_argument("--output", required=True, type=Path, help="the megapico run directory to create: runs/RUN")
    parser.add_argument("--config", help="megapico YAML of the run that continues (e.g. the recipe of that size)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        config = load_config(args.config, [*args.overrides, f"checkpointing.runs_dir={args.output.parent}",
                                           f"checkpointing.run_name={args.output.name}"])
        written, checkpoint = pico_train_to_megapico(args.checkpoint, config)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"read {args.checkpoint}: {checkpoint.layout}, step {checkpoint.step}, global batch "
          f"{checkpoint.global_batch}")
    print(f"wrote {written} (weights, fp32 masters, Adam moments and step, schedule at step {checkpoint.step}, "
          f"{checkpoint.step * checkpoint.global_batch:,} consumed rows; read back equal); pretrain.py with "
          f"checkpointing.runs_dir={args.output.parent} checkpointing.run_name={args.output.name} resumes it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
