#!/usr/bin/env bash
# megapico end to end on the shipped Dolma sample, on CPU, in a few minutes:
#   1. set up ./.venv (first run only)
#   2. preprocess data/sample/documents -> Megatron .bin/.idx with pico's tokenizer
#   3. train pico-decoder-tiny with DeepSpeed ZeRO-2 on 2 CPU processes (DP=2) for 20 steps, checkpoint, stop
#   4. resume the same run at TP=2 (the checkpoint is re-sharded) to step 40, with evaluation
#   5. convert every checkpoint (steps 0, 20, 40) into a pico run directory: verified HF checkpoints +
#      learning dynamics, readable by pico-analyze (--run_path runs/pico/cpu-demo) and transformers; draw the
#      run's metrics (runs/cpu-demo/metrics.png) and sample a few tokens from the last checkpoint
# Outputs: runs/cpu-demo/ (config.yaml, checkpoints/, eval_results/, wandb/ offline logs), runs/pico/cpu-demo/.
# Each run starts fresh: it removes the outputs of an earlier demo run (runs/cpu-demo*, runs/pico/cpu-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}" PYTHONUNBUFFERED=1
export WANDB_SILENT=true
# glibc's malloc hands large tensors back to the OS when freed, so every step page-faults its big buffers in again
# (the loss head's logits chunks): keep freed memory in the process (mallopt(3)); the demo's steps run ~16% faster
export MALLOC_MMAP_THRESHOLD_=8589934592 MALLOC_TRIM_THRESHOLD_=8589934592 MALLOC_TOP_PAD_=1073741824
rm -rf runs/cpu-demo runs/cpu-demo-data runs/pico/cpu-demo

echo "== 1/4 preprocess the shipped Dolma sample"
.venv/bin/python tools/preprocess_data.py --input data/sample/documents --output-prefix runs/cpu-demo-data/sample \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizers/olmo-gpt-neox-dolma-v1_5.json \
    --append-eod --workers 2

echo "== 2/4 train: DeepSpeed ZeRO-2, DP=2 on 2 CPU processes, steps 1-20"
.venv/bin/deepspeed --num_gpus 2 pretrain.py --config examples/cpu_demo.yaml training.exit_interval=20

echo "== 3/4 resume at TP=2 (checkpoint re-sharded), steps 21-40, eval"
.venv/bin/deepspeed --num_gpus 2 pretrain.py --config examples/cpu_demo.yaml parallel.tensor_parallel_size=2

echo "== 4/4 convert every checkpoint into a pico run directory (HF checkpoints + learning dynamics), draw the run"
.venv/bin/python tools/convert_to_hf.py --run-dir runs/cpu-demo --output runs/pico
.venv/bin/python tools/plot_run.py runs/cpu-demo
.venv/bin/python tools/generate.py --checkpoint runs/cpu-demo/checkpoints/latest --prompt "The history of" \
    --max-new-tokens 16

echo "== done"
echo "eval at step 40: $(cat runs/cpu-demo/eval_results/step_40.json)"
echo "run record:      runs/cpu-demo/metrics.jsonl, drawn in runs/cpu-demo/metrics.png"
echo "HF model:        AutoModelForCausalLM.from_pretrained('runs/pico/cpu-demo/checkpoints/latest', trust_remote_code=True)"
echo "pico-analyze:    python scripts/analyze.py --config_path CFG.yaml --run_path $PWD/runs/pico/cpu-demo"
