#!/usr/bin/env bash
# pico-decoder-tiny (or another size: pass its YAML) on 16 A100s = 2 nodes x 8 via DeepSpeed's launcher.
#   bash examples/pico_tiny_16xA100.sh [examples/pico_small_16xA100.yaml] [section.key=value ...]
# Edit examples/hostfile first. Run from the repo root on the first node; the repo, its .venv and runs/ must be at
# the same path on both nodes, and runs/ on a filesystem both share (docs/preemption.md: Launchers). DeepSpeed's pdsh launcher
# forwards only NCCL*, PYTHON*, UCX*, MV2* and MLFLOW* variables (plus a .deepspeed_env file) to the other node;
# megapico needs none of its own. On SLURM use examples/pico_tiny_16xA100.slurm instead.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-examples/pico_tiny_16xA100.yaml}
shift || true
exec .venv/bin/deepspeed --hostfile examples/hostfile --num_nodes 2 --num_gpus 8 \
    pretrain.py --config "$config" "$@"
