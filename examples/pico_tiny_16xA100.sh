#!/usr/bin/env bash
# pico-decoder-tiny (or another size: pass its YAML) on 16 A100s = 2 nodes x 8 via DeepSpeed's launcher.
#   bash examples/pico_tiny_16xA100.sh [examples/pico_small_16xA100.yaml] [section.key=value ...]
# Edit examples/hostfile first. Run from the repo root on the first node.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-examples/pico_tiny_16xA100.yaml}
shift || true
export NCCL_ASYNC_ERROR_HANDLING=1 CUDA_DEVICE_MAX_CONNECTIONS=1
exec .venv/bin/deepspeed --hostfile examples/hostfile --num_nodes 2 --num_gpus 8 \
    pretrain.py --config "$config" "$@"
