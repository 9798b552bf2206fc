#!/usr/bin/env bash
# Continued pretraining with LoRA. Override any setting: MODEL=... OUTPUT_DIR=... bash scripts/run_pt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
TRAIN_DIR=${TRAIN_DIR:-data/pretrain}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/pt}
BLOCK_SIZE=${BLOCK_SIZE:-256}
MAX_STEPS=${MAX_STEPS:--1}
EPOCHS=${EPOCHS:-1}
BATCH_SIZE=${BATCH_SIZE:-4}

ensure_model "$MODEL"
launch pretraining.py \
  --model_name_or_path "$MODEL" \
  --train_file_dir "$TRAIN_DIR" \
  --block_size "$BLOCK_SIZE" \
  --use_peft True --target_modules all --lora_rank 8 --lora_alpha 16 --lora_dropout 0 \
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps 1 \
  --learning_rate 2e-4 --num_train_epochs "$EPOCHS" --max_steps "$MAX_STEPS" \
  --logging_steps 5 --save_strategy no \
  --output_dir "$OUTPUT_DIR" "$@"
