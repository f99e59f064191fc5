#!/usr/bin/env bash
# The GPU fidelity check (issue 10): on the 1..8 local GPUs of one machine, pico-decoder-tiny at seq 2048 with the
# 16 x A100 recipe's settings (ds_configs/zero2_a100.json, learning dynamics on), for each precision in
# {bf16-mixed, bf16} and each TP in {1, 2 (with 2+ GPUs)}: 20 steps, converted and verified. Prints each run's
# last log line (tokens/s, MFU, peak memory per GPU) beside tools/estimate_memory.py's figure, and its first-step
# loss beside an fp32 run of the same first batch on the CPU (bf16 tolerance: 1% relative).
#   bash scripts/gpu_check.sh [STEPS]       # results: runs/gpu-check/summary.md
#   PRECISIONS=bf16-mixed bash scripts/gpu_check.sh  # one precision only
#   PYTHON=python3 bash scripts/gpu_check.sh  # a machine without network whose python3 already has torch and
#                                             # megapico's requirements (e.g. carried wheels on PYTHONPATH)
# Without CUDA it refuses with one line and exit code 2.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}
if [ -z "${PYTHON:-}" ]; then
  bash scripts/ensure_venv.sh
fi
py=${PYTHON:-.venv/bin/python}
gpus=$($py -c "import torch; print(min(torch.cuda.device_count(), 8) if torch.cuda.is_available() else 0)")
if [ "$gpus" = 0 ]; then
  echo "error: no CUDA device visible; scripts/gpu_check.sh needs 1..8 local GPUs (run the CPU suite with scripts/test.sh)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1 WANDB_SILENT=true
out=runs/gpu-check
rm -rf "$out" && mkdir -p "$out"
$py tools/preprocess_data.py --input data/sample/documents --output-prefix "$out/data/sample" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizers/olmo-gpt-neox-dolma-v1_5.json \
    --append-eod --workers 4 > "$out/preprocess.log"
common=(data.train_data_path="[$out/data/sample_text_document]" data.eval_data_path="[]" data.split="90,10,0"
        training.max_steps="$steps" training.lr_warmup_steps=2 training.gradient_accumulation_steps=1
        training.global_batch_size=0 evaluation.interval=0 evaluation.max_sequences=64 evaluation.perplexity=tokens
        checkpointing.runs_dir="$out" checkpointing.save_interval="$steps" checkpointing.resume=false
        logging.log_interval=5 logging.wandb_mode=disabled)

# fp32 on the CPU, one step over the same global batch (micro 16 x accumulation $gpus = the GPUs' micro 16 x DP).
# The same max_steps, stopped by exit_interval after step 1: the sample order depends on the samples a run needs.
CUDA_VISIBLE_DEVICES="" $py pretrain.py --config examples/pico_tiny_16xA100.yaml "${common[@]}" \
    training.exit_interval=1 training.micro_batch_size=16 training.precision=fp32 training.compile=false \
    training.deepspeed_config=ds_configs/zero2_cpu.json \
    training.gradient_accumulation_steps="$gpus" checkpointing.learning_dynamics.enabled=false \
    checkpointing.run_name=cpu-fp32 > "$out/cpu-fp32.log" 2>&1
cpu_loss=$(grep -m1 -oP "step 1/$steps \| loss \K[0-9.]+" "$out/cpu-fp32.log")

{
  echo "# GPU check: $($py -c 'import torch; print(torch.cuda.get_device_name())') x $gpus, torch $($py -c 'import torch; print(torch.__version__)')"
  echo
  echo "fp32 CPU first-step loss: $cpu_loss"
  echo
  echo "| precision | TP | DP | step-1 loss | vs fp32 | last log line | estimate GiB (tools/estimate_memory.py) | export |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$out/summary.md"
status=0
for precision in ${PRECISIONS:-bf16-mixed bf16}; do
  for tp in 1 2; do
    [ "$tp" -le "$gpus" ] || continue
    run="$precision-tp$tp"
    micro=$((16 * tp))  # the same global batch (16 x GPUs sequences) at every TP size
    if ! $py -m torch.distributed.run --standalone --nproc_per_node "$gpus" pretrain.py \
        --config examples/pico_tiny_16xA100.yaml "${common[@]}" training.precision="$precision" \
        training.micro_batch_size=$micro parallel.tensor_parallel_size="$tp" checkpointing.run_name="$run" > "$out/$run.log" 2>&1; then
      echo "| $precision | $tp | $((gpus / tp)) | FAILED: see $out/$run.log | | | | |" >> "$out/summary.md"
      status=1
      continue
    fi
    step1=$(grep -m1 -oP "step 1/$steps \| loss \K[0-9.]+" "$out/$run.log")
    last=$(grep -oP "step $steps/$steps \|.*" "$out/$run.log" | tail -1)
    estimate=$($py tools/estimate_memory.py --config examples/pico_tiny_16xA100.yaml --gpus "$gpus" \
        parallel.tensor_parallel_size="$tp" training.precision="$precision" training.micro_batch_size=$micro \
        training.gradient_accumulation_steps=1 training.global_batch_size=0 | tail -1 | awk -F'|' '{print $(NF-3)}')
    if $py tools/convert_to_hf.py --checkpoint "$out/$run/checkpoints/latest" --output "$out/$run-hf" \
        > "$out/$run-convert.log" 2>&1; then export_result="verified: $(grep -oP 'max \|logit diff\| \S+' "$out/$run-convert.log")"
    else export_result="FAILED"; status=1; fi
    gap=$($py -c "print(f'{abs($step1 - $cpu_loss) / $cpu_loss:.2%}')")
    echo "| $precision | $tp | $((gpus / tp)) | $step1 | $gap | \`$last\` | $estimate | $export_result |" >> "$out/summary.md"
  done
done
cat "$out/summary.md"
exit $status
