#!/usr/bin/env bash
# Answer a question file in batches: one process (inference.py), or NPROC processes / GPUs
# (inference_multigpu_demo.py: each takes its share, the output stays in input order and resumes).
# Override any setting: MODEL=outputs/pipeline/dpo-merged NPROC=4 bash scripts/inference_batch.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
LORA_MODEL=${LORA_MODEL:-}
TEMPLATE=${TEMPLATE:-auto}
QUESTIONS=${QUESTIONS:-data/eval/questions.jsonl}
OUTPUT_FILE=${OUTPUT_FILE:-outputs/answers.jsonl}
BATCH_SIZE=${BATCH_SIZE:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-256}

ensure_model "$MODEL"
mkdir -p "$(dirname "$OUTPUT_FILE")"
script=inference.py
if [ "$NPROC" -gt 1 ]; then script=inference_multigpu_demo.py; fi
launch "$script" --base_model "$MODEL" ${LORA_MODEL:+--lora_model "$LORA_MODEL"} --template_name "$TEMPLATE" \
  --data_file "$QUESTIONS" --output_file "$OUTPUT_FILE" --batch_size "$BATCH_SIZE" \
  --max_new_tokens "$MAX_NEW_TOKENS" --temperature 0 "$@"
