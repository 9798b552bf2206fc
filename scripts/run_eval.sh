#!/usr/bin/env bash
# Compare models on the held-out medical set (or your own files): multiple choice, open questions,
# answer perplexity; results.json, results.md and comparison.png in OUTPUT_DIR.
#   MODELS="base=models/SmolLM2-135M-Instruct final=outputs/pipeline/dpo-merged" bash scripts/run_eval.sh
#   MODELS="sft=models/SmolLM2-135M-Instruct+outputs/sft" bash scripts/run_eval.sh        # base + adapter
#   API_BASE=http://127.0.0.1:8000/v1 API_MODELS=reference=medgpt bash scripts/run_eval.sh  # and an endpoint
#   MC_FILE=downloads/medqa/test.jsonl MC_FORMAT=medqa bash scripts/run_eval.sh             # a public benchmark
# Extra flags go to evaluate_models.py, e.g. --max_questions 40 --preference_file data/reward.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODELS=${MODELS-models/SmolLM2-135M-Instruct}   # set it empty to evaluate only an endpoint
API_BASE=${API_BASE:-}
API_MODELS=${API_MODELS:-}
MC_FILE=${MC_FILE:-data/eval/multiple_choice.jsonl}
MC_FORMAT=${MC_FORMAT:-auto}
OPEN_FILE=${OPEN_FILE:-data/eval/open_questions.jsonl}
CONVERSATIONS=${CONVERSATIONS:-data/eval/finetune}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/eval}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
BATCH_SIZE=${BATCH_SIZE:-16}

for model in $MODELS; do model=${model#*=}; ensure_model "${model%%+*}"; done
# shellcheck disable=SC2086  # MODELS and API_MODELS are space-separated lists
"$PYTHON" evaluate_models.py ${MODELS:+--models $MODELS} ${API_BASE:+--api_base "$API_BASE"} \
  ${API_MODELS:+--api_models $API_MODELS} \
  ${MC_FILE:+--mc_file "$MC_FILE" --mc_format "$MC_FORMAT"} ${OPEN_FILE:+--open_file "$OPEN_FILE"} \
  ${CONVERSATIONS:+--ppl_conversation_file "$CONVERSATIONS"} \
  --max_new_tokens "$MAX_NEW_TOKENS" --batch_size "$BATCH_SIZE" --output_dir "$OUTPUT_DIR" "$@"
