#!/usr/bin/env bash
# Serve a merged model folder with vLLM's OpenAI-compatible server (CUDA GPUs; after
# `bash scripts/setup_env.sh --vllm`). The chat template saved in the model's tokenizer is the one used, so
# vLLM renders the prompts the model was trained on.
# Override any setting: MODEL=outputs/pipeline/dpo-merged PORT=8000 API_KEY=secret bash scripts/serve_vllm.sh
# LORA_MODULES="doctor=outputs/sft" also serves adapters (--enable-lora), chosen by a request's `model`.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm/bin/python}
MODEL=${MODEL:-outputs/pipeline/dpo-merged}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
SERVED_MODEL_NAME=${SERVED_MODEL_NAME:-$(basename "$MODEL")}
LORA_MODULES=${LORA_MODULES:-}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
API_KEY=${API_KEY:-${MEDGPT_API_KEY:-}}

if [ ! -x "$VLLM_PYTHON" ]; then
  echo "error: $VLLM_PYTHON not found: run bash scripts/setup_env.sh --vllm first (CUDA GPUs only)" >&2; exit 2
fi
if [ ! -f "$MODEL/config.json" ]; then
  echo "error: $MODEL: not a model folder (vLLM serves merged models; merge an adapter with scripts/merge_lora.sh)" >&2; exit 2
fi
# shellcheck disable=SC2086  # LORA_MODULES is a list of name=path words
exec "$(dirname "$VLLM_PYTHON")/vllm" serve "$MODEL" --served-model-name "$SERVED_MODEL_NAME" \
  --host "$HOST" --port "$PORT" --max-model-len "$MAX_MODEL_LEN" \
  ${API_KEY:+--api-key "$API_KEY"} \
  ${LORA_MODULES:+--enable-lora --lora-modules $LORA_MODULES} "$@"
