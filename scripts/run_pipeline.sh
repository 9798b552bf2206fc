#!/usr/bin/env bash
# The whole path on one model: continued pretraining -> SFT (continuing the PT adapter) -> merge ->
# answers to held-out questions. Defaults: the embedded SmolLM2-135M-Instruct and the sample data,
# sized to finish on a laptop CPU in minutes. Override any setting from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
export PYTHON NPROC
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
TEMPLATE=${TEMPLATE:-chatml}
OUT=${OUT:-outputs/pipeline}
PT_STEPS=${PT_STEPS:-10}
SFT_EPOCHS=${SFT_EPOCHS:-1}
QUESTIONS=${QUESTIONS:-data/eval/questions.jsonl}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-96}

start=$(date +%s)
ensure_model "$MODEL"

echo "== 1/4 continued pretraining"
MODEL="$MODEL" OUTPUT_DIR="$OUT/pt" MAX_STEPS="$PT_STEPS" bash scripts/run_pt.sh

echo "== 2/4 supervised fine-tuning (continuing the pretraining adapter)"
MODEL="$MODEL" TEMPLATE="$TEMPLATE" PEFT_PATH="$OUT/pt" OUTPUT_DIR="$OUT/sft" EPOCHS="$SFT_EPOCHS" bash scripts/run_sft.sh

echo "== 3/4 merging the adapter"
BASE_MODEL="$MODEL" LORA_MODEL="$OUT/sft" OUTPUT_DIR="$OUT/merged" bash scripts/merge_lora.sh

echo "== 4/4 answering held-out questions"
"$PYTHON" inference.py --base_model "$OUT/merged" --data_file "$QUESTIONS" --output_file "$OUT/answers.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS" --temperature 0 --repetition_penalty 1.1 --batch_size 12
"$PYTHON" - "$OUT/answers.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    row = json.loads(line)
    print(f"\nQ: {row['input']}\nA: {row['output']}")
PY
echo
echo "pipeline finished in $(( $(date +%s) - start )) s; merged model: $OUT/merged, answers: $OUT/answers.jsonl"
