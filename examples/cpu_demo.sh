#!/usr/bin/env bash
# megapico end to end on the shipped Dolma sample, on CPU, in a few minutes:
#   1. set up ./.venv (first run only)
#   2. preprocess data/sample/documents -> Megatron .bin/.idx with pico's tokenizer
#   3. train pico-decoder-tiny with DeepSpeed ZeRO-2 on 2 CPU processes (DP=2) for 20 steps, checkpoint, stop
#   4. resume the same run at TP=2 (the checkpoint is re-sharded) to step 40, with evaluation
#   5. convert every checkpoint (steps 0, 20, 40) into a pico run directory: verified HF checkpoints +
#      learning dynamics, readable by pico-analyze (--run_path runs/pico/cpu-demo) and transformers; draw the
#      run's metrics (runs/cpu-demo/metrics.png), sample a few tokens from the last checkpoint, and trace a
#      training sample back to the source documents (file:line) it was cut from
# Outputs: runs/cpu-demo/ (config.yaml, checkpoints/, eval_results/, wandb/ offline logs), runs/pico/cpu-demo/.
# Each run starts fresh: it removes the outputs of an earlier demo run (runs/cpu-demo*, runs/pico/cpu-demo).
#   bash examples/cpu_demo.sh                       # each launch's rendezvous port: a free one, picked by the OS
#   bash examples/cpu_demo.sh --master_port 29600   # that port (refused in one line when another process has it)
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash examples/cpu_demo.sh [--master_port PORT]"
port=""
while [ $# -gt 0 ]; do
  case "$1" in
    --master_port) [ $# -ge 2 ] || { echo "error: --master_port needs a port number; $usage" >&2; exit 2; }
                   port=$2; shift 2 ;;
    --master_port=*) port=${1#*=}; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "error: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
if [ -n "$port" ] && ! [[ "$port" =~ ^[0-9]+$ && "$port" -ge 1 && "$port" -le 65535 ]]; then
  echo "error: --master_port '$port' is not a port number (1-65535)" >&2
  exit 2
fi
bash scripts/ensure_venv.sh
# The port for the next launch: --master_port's when it is free, else one the OS picks (port 0). torch's rendezvous
# listens on every interface with SO_REUSEADDR, so a port is free when a socket like that can bind it.
rendezvous_port() {
  .venv/bin/python -c 'import socket, sys
with socket.socket() as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("", int(sys.argv[1])))
    except OSError as err:
        sys.exit(f"error: --master_port {sys.argv[1]} is taken ({err.strerror}); pick another, or leave it out")
    print(sock.getsockname()[1])' "${port:-0}"
}
rendezvous_port >/dev/null  # a taken --master_port stops the demo here, before any work
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}" PYTHONUNBUFFERED=1
export WANDB_SILENT=true
# glibc's malloc hands large tensors back to the OS when freed, so every step page-faults its big buffers in again
# (the loss head's logits chunks): keep freed memory in the process (mallopt(3)); the demo's steps run ~16% faster.
# The README's Install shell exports these and TORCH_EXTENSIONS_DIR alike, for runs of your own: keep them in step.
export MALLOC_MMAP_THRESHOLD_=8589934592 MALLOC_TRIM_THRESHOLD_=8589934592 MALLOC_TOP_PAD_=1073741824
rm -rf runs/cpu-demo runs/cpu-demo-data runs/pico/cpu-demo

echo "== 1/4 preprocess the shipped Dolma sample"
.venv/bin/python tools/preprocess_data.py --input data/sample/documents --output-prefix runs/cpu-demo-data/sample \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizers/olmo-gpt-neox-dolma-v1_5.json \
    --append-eod --workers 2

echo "== 2/4 train: DeepSpeed ZeRO-2, DP=2 on 2 CPU processes, steps 1-20"
launch_port=$(rendezvous_port)
echo "rendezvous port: $launch_port"
.venv/bin/deepspeed --num_gpus 2 --master_port "$launch_port" pretrain.py --config examples/cpu_demo.yaml \
    training.exit_interval=20

echo "== 3/4 resume at TP=2 (checkpoint re-sharded), steps 21-40, eval"
launch_port=$(rendezvous_port)
echo "rendezvous port: $launch_port"
.venv/bin/deepspeed --num_gpus 2 --master_port "$launch_port" pretrain.py --config examples/cpu_demo.yaml \
    parallel.tensor_parallel_size=2

echo "== 4/4 convert every checkpoint into a pico run directory (HF checkpoints + learning dynamics), draw the run"
.venv/bin/python tools/convert_to_hf.py --run-dir runs/cpu-demo --output runs/pico
.venv/bin/python tools/plot_run.py runs/cpu-demo
.venv/bin/python tools/generate.py --checkpoint runs/cpu-demo/checkpoints/latest --prompt "The history of" \
    --max-new-tokens 16
echo "-- where step 40's first training sample (624 = 39 x 16) came from; --step 40 lists the whole batch (each document's file:line in the sample)"
.venv/bin/python tools/trace_data.py --run-dir runs/cpu-demo --sample 624

echo "== done"
echo "eval at step 40: $(cat runs/cpu-demo/eval_results/step_40.json)"
echo "run record:      runs/cpu-demo/metrics.jsonl, drawn in runs/cpu-demo/metrics.png"
echo "HF model:        AutoModelForCausalLM.from_pretrained('runs/pico/cpu-demo/checkpoints/latest', trust_remote_code=True)"
echo "pico-analyze:    python scripts/analyze.py --config_path CFG.yaml --run_path $PWD/runs/pico/cpu-demo"
