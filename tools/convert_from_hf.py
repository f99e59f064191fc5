"""Turn a pico HF checkpoint into a megapico training checkpoint at a chosen TP size, to continue pretraining.

    hf download pico-lm/pico-decoder-tiny --local-dir pico-decoder-tiny
    python tools/convert_from_hf.py --hf pico-decoder-tiny/ --config examples/cpu_demo.yaml \\
        parallel.tensor_parallel_size=2 checkpointing.run_name=continued
    deepspeed --num_gpus 2 pretrain.py --config examples/cpu_demo.yaml parallel.tensor_parallel_size=2 \\
        checkpointing.run_name=continued                 # resumes from step_0 with the HF weights
The model section comes from the HF config.json; everything else from --config and the overrides.
"""

import argparse
import sys

from megapico.config import ConfigError, load_config
from megapico.convert.checkpoint_reader import CheckpointError
from megapico.convert.from_hf import hf_to_megapico


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="pico HF directory (config.json + model.safetensors)")
    parser.add_argument("--config", help="megapico YAML for the run that will continue from it")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. parallel.tensor_parallel_size=2")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        directory = hf_to_megapico(args.hf, config)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {directory} (TP={config.parallel.tensor_parallel_size}); pretrain.py with run_name "
          f"{config.checkpointing.run_name} continues from it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
