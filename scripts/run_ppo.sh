#!/usr/bin/env bash
# PPO with LoRA: the SFT model answers prompts, the reward model scores them. NPROC>1 runs torchrun (each
# process answers ROLLOUT_BATCH prompts per iteration; gradients are averaged). A checkpoint every
# SAVE_STEPS iterations; continue a stopped run with --resume_from_checkpoint last (same settings).
# Override: MODEL=... REWARD_MODEL=... OUTPUT_DIR=... NPROC=2 bash scripts/run_ppo.sh [extra flags]
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
MICRO_BATCH=${MICRO_BATCH:-4}
GRAD_ACCUM=${GRAD_ACCUM:-1}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
SAVE_STEPS=${SAVE_STEPS:-50}

ensure_model "$MODEL"
launch ppo_training.py \
  --model_name_or_path "$MODEL" \
  --template_name "$TEMPLATE" \
  --train_file_dir "$TRAIN_DIR" \
  --reward_funcs model --reward_model_path "$REWARD_MODEL" \
  --use_peft True --target_modules all --lora_rank 8 --lora_alpha 16 --lora_dropout 0 \
  ${PEFT_PATH:+--peft_path "$PEFT_PATH"} \
  --rollout_batch_size "$ROLLOUT_BATCH" --per_device_train_batch_size "$MICRO_BATCH" \
  --gradient_accumulation_steps "$GRAD_ACCUM" --ppo_epochs 2 \
  --max_new_tokens "$MAX_NEW_TOKENS" --kl_coef 0.05 --learning_rate 1e-5 --max_steps "$MAX_STEPS" \
  --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 2 \
  --output_dir "$OUTPUT_DIR" "$@"
