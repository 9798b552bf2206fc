#!/usr/bin/env bash
# Serve a model through the OpenAI-compatible API (openai_api.py) on 127.0.0.1:PORT.
# Override any setting: MODEL=outputs/pipeline/dpo-merged PORT=8001 API_KEY=secret bash scripts/serve_api.sh [extra flags]
# LORA_MODULES="doctor=outputs/sft nurse=outputs/sft2" serves adapters next to the model, chosen by `model`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
TEMPLATE=${TEMPLATE:-auto}   # auto: the template saved with the model
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-}
LORA_MODULES=${LORA_MODULES:-}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-8}
export MEDGPT_API_KEY=${API_KEY:-${MEDGPT_API_KEY:-}}   # empty: no key needed

ensure_model "$MODEL"
# shellcheck disable=SC2086  # LORA_MODULES is a list of name=path words
exec "$PYTHON" openai_api.py --base_model "$MODEL" --template_name "$TEMPLATE" --host "$HOST" --port "$PORT" \
  --max_batch_size "$MAX_BATCH_SIZE" \
  ${SERVED_MODEL_NAME:+--served_model_name "$SERVED_MODEL_NAME"} \
  ${LORA_MODULES:+--lora_modules $LORA_MODULES} "$@"
