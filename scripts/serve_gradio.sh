#!/usr/bin/env bash
# The chat page (gradio_demo.py) on http://127.0.0.1:PORT.
# Override any setting: MODEL=outputs/pipeline/dpo-merged PORT=7861 bash scripts/serve_gradio.sh [--share True]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
LORA_MODEL=${LORA_MODEL:-}
TEMPLATE=${TEMPLATE:-auto}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-7860}

ensure_model "$MODEL"
exec "$PYTHON" gradio_demo.py --base_model "$MODEL" ${LORA_MODEL:+--lora_model "$LORA_MODEL"} --template_name "$TEMPLATE" \
  --host "$HOST" --port "$PORT" "$@"
