"""Pretrain pico-decoder with tensor parallelism + DeepSpeed ZeRO-2.

    deepspeed --num_gpus 2 pretrain.py --config examples/cpu_demo.yaml     (--num_gpus: GPUs per node)
    deepspeed --hostfile examples/hostfile --num_nodes 2 --num_gpus 8 pretrain.py \\
        --config examples/pico_tiny_16xA100.yaml                         (2 nodes x 8 GPUs)
    torchrun --standalone --nproc_per_node 2 pretrain.py --config examples/cpu_demo.yaml training.max_steps=20
    python pretrain.py --config examples/cpu_demo.yaml parallel.tensor_parallel_size=1
Any config value can be overridden as section.key=value; the resolved config is printed and saved.
"""

import argparse
import os
import sys

from megapico.checkpoint.paths import CheckpointError
from megapico.checkpoint.run_lock import RunLockedError
from megapico.checkpoint.training_state import CheckpointIntegrityError
from megapico.config import ConfigError, load_config
from megapico.data.blended_dataset import UnsafeCacheError
from megapico.data.indexed_dataset import DataError
from megapico.parallel import LaunchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of the megapico config (see megapico/config/schema.py)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the YAML")
    args = parser.parse_args(argv)
    if args.config is None and not args.overrides:
        print("error: no config given; pass --config FILE.yaml (e.g. examples/cpu_demo.yaml) and/or section.key=value "
              "overrides", file=sys.stderr)
        return 1
    try:
        config = load_config(args.config, args.overrides)
        from megapico.convert.retention import retention_hook
        from megapico.publish.background import BackgroundPublisher
        from megapico.training.trainer import pretrain  # deepspeed is imported only once the config is valid

        pretrain(config, after_checkpoint=retention_hook(config), publisher=BackgroundPublisher.from_config(config))
    except (ConfigError, DataError, LaunchError, CheckpointError, CheckpointIntegrityError, UnsafeCacheError,
            RunLockedError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:  # shut the process group down here, not in interpreter teardown while peers may already be gone
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without interpreter teardown. Once the process group is gone, destructors that DeepSpeed's and gloo's
    # C++ objects run in teardown abort the process now and then ("terminate called without an active exception",
    # exit -6: 2 of 20 two-rank exits of a test script, 0 of 20 with os._exit), which turned a clean one-line error
    # into a crash. Everything a run writes is closed by now; only the standard streams need flushing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
