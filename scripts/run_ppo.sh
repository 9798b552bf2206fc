#!/usr/bin/env bash
# PPO with LoRA: the SFT model answers prompts, the reward model scores them. One process (PPO here
# does not use torchrun). Override: MODEL=... REWARD_MODEL=... OUTPUT_DIR=... bash scripts/run_ppo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODEL=${MODEL:-outputs/sft-merged}
REWARD_MODEL=${REWARD_MODEL:-outputs/rm}
TEMPLATE=${TEMPLATE:-chatml}
TRAIN_DIR=${TRAIN_DIR:-data/grpo}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/ppo}
PEFT_PATH=${PEFT_PATH:-}
MAX_STEPS=${MAX_STEPS:-10}
ROLLOUT_BATCH=${ROLLOUT_BATCH:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}

ensure_model "$MODEL"
"$PYTHON" ppo_training.py \
  --model_name_or_path "$MODEL" \
  --template_name "$TEMPLATE" \
  --train_file_dir "$TRAIN_DIR" \
  --reward_funcs model --reward_model_path "$REWARD_MODEL" \
  --use_peft True --target_modules all --lora_rank 8 --lora_alpha 16 --lora_dropout 0 \
  ${PEFT_PATH:+--peft_path "$PEFT_PATH"} \
  --rollout_batch_size "$ROLLOUT_BATCH" --mini_batch_size 4 --ppo_epochs 2 \
  --max_new_tokens "$MAX_NEW_TOKENS" --kl_coef 0.05 --learning_rate 1e-5 --max_steps "$MAX_STEPS" \
  --output_dir "$OUTPUT_DIR" "$@"
