#!/usr/bin/env bash
# The shared body of run_rm.sh, run_dpo.sh and run_orpo.sh: a LoRA stage on preference pairs.
# STAGE_SCRIPT names the stage's script; the callers set their own defaults and extra flags.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODEL=${MODEL:-outputs/sft-merged}
TEMPLATE=${TEMPLATE:-chatml}
TRAIN_DIR=${TRAIN_DIR:-data/reward}
PEFT_PATH=${PEFT_PATH:-}
MAX_LENGTH=${MAX_LENGTH:-384}
MAX_STEPS=${MAX_STEPS:--1}
EPOCHS=${EPOCHS:-1}
BATCH_SIZE=${BATCH_SIZE:-4}

BATCH_FLAGS=$(batch_flags)
ensure_model "$MODEL"
launch "$STAGE_SCRIPT" \
  --model_name_or_path "$MODEL" \
  --template_name "$TEMPLATE" \
  --train_file_dir "$TRAIN_DIR" \
  --max_length "$MAX_LENGTH" --max_prompt_length $(( MAX_LENGTH / 2 )) \
  --use_peft True --target_modules all --lora_rank 8 --lora_alpha 16 --lora_dropout 0 \
  ${PEFT_PATH:+--peft_path "$PEFT_PATH"} \
  $BATCH_FLAGS --train_sampling_strategy group_by_length \
  --learning_rate "$LEARNING_RATE" --num_train_epochs "$EPOCHS" --max_steps "$MAX_STEPS" \
  --logging_steps 5 --save_strategy no \
  --output_dir "$OUTPUT_DIR" "$@"
