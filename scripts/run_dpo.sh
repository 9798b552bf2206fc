#!/usr/bin/env bash
# Direct preference optimization (DPO) with LoRA on preference pairs. MODEL: the SFT model (merged
# folder), or the base model with PEFT_PATH=its SFT adapter. BETA: DPO's beta. Other settings (MODEL,
# TRAIN_DIR, MAX_LENGTH, BATCH_SIZE, ...): see run_preference_stage.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
BETA=${BETA:-0.1}
export STAGE_SCRIPT=dpo_training.py OUTPUT_DIR=${OUTPUT_DIR:-outputs/dpo} LEARNING_RATE=${LEARNING_RATE:-5e-5}
exec bash scripts/run_preference_stage.sh --beta "$BETA" "$@"
