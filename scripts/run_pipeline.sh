#!/usr/bin/env bash
# The whole path on one model: continued pretraining -> SFT -> an alignment stage -> merge -> answers to
# held-out questions -> the model before and after, compared on the held-out evaluation set.
# STAGES picks the stages, in order, from: pt sft rm ppo dpo orpo grpo
#   STAGES="pt sft dpo"      (default)      STAGES="pt sft rm ppo"      STAGES="sft orpo"      STAGES="sft grpo"
# SFT continues the PT adapter; each later stage trains a new LoRA adapter on the model merged so far and
# is merged in turn; rm trains the reward model that ppo then uses. Defaults: the embedded
# SmolLM2-135M-Instruct and the sample data, sized to finish on a laptop CPU in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
export PYTHON NPROC
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
TEMPLATE=${TEMPLATE:-chatml}
OUT=${OUT:-outputs/pipeline}
STAGES=${STAGES:-pt sft dpo}
PT_STEPS=${PT_STEPS:-5}
SFT_EPOCHS=${SFT_EPOCHS:-1}
SFT_STEPS=${SFT_STEPS:--1}   # > 0 overrides SFT_EPOCHS
ALIGN_STEPS=${ALIGN_STEPS:-6}
QUESTIONS=${QUESTIONS:-data/eval/questions.jsonl}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-96}
EVAL_QUESTIONS=${EVAL_QUESTIONS:-60}   # per held-out file, spread over it; 0: all of them
export TEMPLATE

# Check the whole list before spending minutes on its first stages.
reward_model=${REWARD_MODEL:-}   # a reward model folder for ppo, if no rm stage trains one
have_reward_model=$reward_model
for stage in $STAGES; do
  case "$stage" in
    pt|sft|dpo|orpo|grpo) ;;
    rm) have_reward_model=yes ;;
    ppo) if [ -z "$have_reward_model" ]; then
           echo "error: STAGES has ppo without an rm stage before it (or set REWARD_MODEL)" >&2; exit 2
         fi ;;
    *) echo "error: unknown stage '$stage' in STAGES (use pt sft rm ppo dpo orpo grpo)" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
ensure_model "$MODEL"
current=$MODEL   # the policy so far: a complete model folder
pt_adapter=""

merge_into_current() {  # merge_into_current ADAPTER NAME
  BASE_MODEL="$current" LORA_MODEL="$1" OUTPUT_DIR="$OUT/$2-merged" bash scripts/merge_lora.sh
  current="$OUT/$2-merged"
}

for stage in $STAGES; do
  echo "== $stage (from $current)"
  case "$stage" in
    pt)
      MODEL="$current" OUTPUT_DIR="$OUT/pt" MAX_STEPS="$PT_STEPS" bash scripts/run_pt.sh
      pt_adapter="$OUT/pt" ;;
    sft)
      MODEL="$current" PEFT_PATH="$pt_adapter" OUTPUT_DIR="$OUT/sft" EPOCHS="$SFT_EPOCHS" MAX_STEPS="$SFT_STEPS" \
        bash scripts/run_sft.sh
      merge_into_current "$OUT/sft" sft ;;
    rm)
      MODEL="$current" OUTPUT_DIR="$OUT/rm" MAX_STEPS="$ALIGN_STEPS" bash scripts/run_rm.sh
      reward_model="$OUT/rm" ;;
    ppo)
      MODEL="$current" REWARD_MODEL="$reward_model" OUTPUT_DIR="$OUT/ppo" MAX_STEPS="$ALIGN_STEPS" bash scripts/run_ppo.sh \
        --overwrite_output_dir True  # a rerun of the pipeline starts over, as every stage does
      merge_into_current "$OUT/ppo" ppo ;;
    dpo|orpo|grpo)
      MODEL="$current" OUTPUT_DIR="$OUT/$stage" MAX_STEPS="$ALIGN_STEPS" bash "scripts/run_$stage.sh"
      merge_into_current "$OUT/$stage" "$stage" ;;
  esac
done

echo "== answering held-out questions with $current"
"$PYTHON" inference.py --base_model "$current" --data_file "$QUESTIONS" --output_file "$OUT/answers.jsonl" \
  --max_new_tokens "$MAX_NEW_TOKENS" --temperature 0 --repetition_penalty 1.1 --batch_size 12
"$PYTHON" - "$OUT/answers.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    row = json.loads(line)
    print(f"\nQ: {row['input']}\nA: {row['output']}")
PY

if [ "$current" = "$MODEL" ]; then
  echo "== no stage changed $MODEL (STAGES=\"$STAGES\" merges nothing): no before/after comparison"
else
  echo "== before and after: $MODEL against $current on the held-out set (data/eval)"
  sample=""
  if [ "$EVAL_QUESTIONS" -gt 0 ]; then sample="--max_questions $EVAL_QUESTIONS"; fi
  # shellcheck disable=SC2086  # $sample is empty or two words
  "$PYTHON" evaluate_models.py --models "before=$MODEL" "after=$current" \
    --mc_file data/eval/multiple_choice.jsonl --open_file data/eval/open_questions.jsonl $sample \
    --default_template "$TEMPLATE" --max_new_tokens 64 --repetition_penalty 1.1 --batch_size 16 \
    --output_dir "$OUT/eval" --overwrite_output_dir True
fi
echo
echo "pipeline ($STAGES) finished in $(( $(date +%s) - start )) s; final model: $current, answers: $OUT/answers.jsonl, evaluation: $OUT/eval"
