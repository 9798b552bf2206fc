#!/usr/bin/env bash
# Reward modeling with LoRA (the score head is trained in full) on preference pairs, 10% held out for
# the pairwise accuracy. MODEL: the SFT model (merged folder), or the base model with PEFT_PATH=its SFT
# adapter. Settings (MODEL, TRAIN_DIR, MAX_LENGTH, BATCH_SIZE, ...): see run_preference_stage.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export STAGE_SCRIPT=reward_modeling.py OUTPUT_DIR=${OUTPUT_DIR:-outputs/rm} LEARNING_RATE=${LEARNING_RATE:-2e-4}
exec bash scripts/run_preference_stage.sh --validation_split_percentage 10 "$@"
