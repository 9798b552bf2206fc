#!/usr/bin/env bash
# Merge a LoRA adapter into its base model. Override: BASE_MODEL=... LORA_MODEL=... OUTPUT_DIR=...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
BASE_MODEL=${BASE_MODEL:-models/SmolLM2-135M-Instruct}
LORA_MODEL=${LORA_MODEL:-outputs/sft}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/merged}

"$PYTHON" merge_peft_adapter.py \
  --base_model "$BASE_MODEL" \
  --lora_model "$LORA_MODEL" \
  --output_dir "$OUTPUT_DIR" --overwrite True "$@"
