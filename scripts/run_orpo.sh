#!/usr/bin/env bash
# ORPO (SFT loss + odds-ratio preference term, no reference model) with LoRA on preference pairs.
# MODEL: the SFT model (merged folder), or the base model with PEFT_PATH=its SFT adapter. BETA: the
# odds-ratio weight. Other settings (MODEL, TRAIN_DIR, MAX_LENGTH, ...): see run_preference_stage.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
BETA=${BETA:-0.1}
export STAGE_SCRIPT=orpo_training.py OUTPUT_DIR=${OUTPUT_DIR:-outputs/orpo} LEARNING_RATE=${LEARNING_RATE:-1e-4}
exec bash scripts/run_preference_stage.sh --orpo_beta "$BETA" "$@"
