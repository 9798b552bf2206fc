#!/usr/bin/env bash
# GRPO with LoRA on questions with short answers, rewarded for accuracy and the <think>/<answer> format.
# MODEL: the SFT model (merged folder). Override: MODEL=... REWARDS=accuracy OUTPUT_DIR=... bash scripts/run_grpo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODEL=${MODEL:-outputs/sft-merged}
TEMPLATE=${TEMPLATE:-chatml}
TRAIN_DIR=${TRAIN_DIR:-data/grpo}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/grpo}
PEFT_PATH=${PEFT_PATH:-}
REWARDS=${REWARDS:-accuracy,format}
REWARD_WEIGHTS=${REWARD_WEIGHTS:-1.0 0.5}
NUM_GENERATIONS=${NUM_GENERATIONS:-4}
MAX_COMPLETION=${MAX_COMPLETION:-64}
MAX_STEPS=${MAX_STEPS:--1}
EPOCHS=${EPOCHS:-1}
BATCH_SIZE=${BATCH_SIZE:-8}

ensure_model "$MODEL"
# shellcheck disable=SC2086  # REWARD_WEIGHTS is a space-separated list of numbers
launch grpo_training.py \
  --model_name_or_path "$MODEL" \
  --template_name "$TEMPLATE" \
  --train_file_dir "$TRAIN_DIR" \
  --reward_funcs "$REWARDS" --reward_weights $REWARD_WEIGHTS \
  --num_generations "$NUM_GENERATIONS" --max_completion_length "$MAX_COMPLETION" \
  --use_peft True --target_modules all --lora_rank 8 --lora_alpha 16 --lora_dropout 0 \
  ${PEFT_PATH:+--peft_path "$PEFT_PATH"} \
  --per_device_train_batch_size "$BATCH_SIZE" \
  --learning_rate 1e-5 --num_train_epochs "$EPOCHS" --max_steps "$MAX_STEPS" \
  --logging_steps 1 --save_strategy no \
  --output_dir "$OUTPUT_DIR" "$@"
