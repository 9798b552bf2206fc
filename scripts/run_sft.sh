#!/usr/bin/env bash
# Supervised fine-tuning with LoRA. PEFT_PATH continues an earlier stage's adapter (e.g. outputs/pt).
# Override any setting: MODEL=... TEMPLATE=qwen OUTPUT_DIR=... bash scripts/run_sft.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
TEMPLATE=${TEMPLATE:-chatml}
TRAIN_DIR=${TRAIN_DIR:-data/finetune}
EVAL_DIR=${EVAL_DIR:-data/eval/finetune}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/sft}
PEFT_PATH=${PEFT_PATH:-}
MAX_LENGTH=${MAX_LENGTH:-512}
MAX_STEPS=${MAX_STEPS:--1}
EPOCHS=${EPOCHS:-1}
BATCH_SIZE=${BATCH_SIZE:-4}

BATCH_FLAGS=$(batch_flags)
ensure_model "$MODEL"
launch supervised_finetuning.py \
  --model_name_or_path "$MODEL" \
  --template_name "$TEMPLATE" \
  --train_file_dir "$TRAIN_DIR" \
  --validation_file_dir "$EVAL_DIR" \
  --model_max_length "$MAX_LENGTH" \
  --use_peft True --target_modules all --lora_rank 8 --lora_alpha 16 --lora_dropout 0 \
  ${PEFT_PATH:+--peft_path "$PEFT_PATH"} \
  $BATCH_FLAGS \
  --train_sampling_strategy group_by_length \
  --learning_rate 2e-4 --num_train_epochs "$EPOCHS" --max_steps "$MAX_STEPS" \
  --logging_steps 5 --save_strategy no \
  --output_dir "$OUTPUT_DIR" "$@"
