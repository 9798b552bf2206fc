#!/usr/bin/env bash
# Build training data from the literature, offline: PubMed abstracts -> pretraining corpus -> question-
# answer pairs written by a model -> with cases synthesised from the knowledge graph and the existing SFT
# data: merged -> near duplicates removed -> validated -> split into training and validation files.
# Defaults: the shipped samples and the embedded default model, a few minutes on a laptop CPU.
# Override any setting: ABSTRACTS=my_exports/ MODEL=outputs/sft-merged OUT=outputs/my_data bash scripts/build_data.sh
# An OpenAI-compatible endpoint writes the pairs instead of MODEL with API_BASE=http://.../v1 API_MODEL=name
# (and $OPENAI_API_KEY). Running it again rebuilds every file and resumes the pairs where they stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
API_BASE=${API_BASE:-}
API_MODEL=${API_MODEL:-}
ABSTRACTS=${ABSTRACTS:-data/literature}
KNOWLEDGE_GRAPH=${KNOWLEDGE_GRAPH:-data/knowledge_graph/rare_diseases.json}
EXTRA_SFT=${EXTRA_SFT-data/finetune}   # existing SFT data merged in; set to empty for none
OUT=${OUT:-outputs/data}
PAIRS_PER_SOURCE=${PAIRS_PER_SOURCE:-3}
CASES_PER_DISEASE=${CASES_PER_DISEASE:-10}
VALIDATION_RATIO=${VALIDATION_RATIO:-0.1}
SEED=${SEED:-42}
TEMPLATE=${TEMPLATE:-chatml}   # the template and token limit SFT will use, for the length check
MAX_LENGTH=${MAX_LENGTH:-1024}

if [ -n "$API_BASE" ]; then
  [ -n "$API_MODEL" ] || { echo "error: API_BASE needs API_MODEL, the endpoint's model name" >&2; exit 2; }
  writer=(--api_base "$API_BASE" --model "$API_MODEL")
else
  ensure_model "$MODEL"
  writer=(--model_name_or_path "$MODEL")
fi
mkdir -p "$OUT/pretrain" "$OUT/sft" "$OUT/sft_validation"
start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "pretraining corpus from $ABSTRACTS"
"$PYTHON" tools/pubmed_corpus.py --input "$ABSTRACTS" --output_file "$OUT/pretrain/corpus.jsonl" --overwrite True

writer_name=$MODEL
if [ -n "$API_BASE" ]; then writer_name="$API_MODEL at $API_BASE"; fi
step "question-answer pairs from the corpus ($writer_name; delete $OUT/qa.jsonl* to write them afresh)"
"$PYTHON" tools/generate_qa.py --input "$OUT/pretrain/corpus.jsonl" --output_file "$OUT/qa.jsonl" \
  --pairs_per_source "$PAIRS_PER_SOURCE" "${writer[@]}"

step "cases from $KNOWLEDGE_GRAPH"
"$PYTHON" tools/synthesize_cases.py --knowledge_graph "$KNOWLEDGE_GRAPH" --output_file "$OUT/cases.jsonl" \
  --cases_per_disease "$CASES_PER_DISEASE" --seed "$SEED" --overwrite True

step "merged, near duplicates removed, validated"
sources=("$OUT/qa.jsonl" "$OUT/cases.jsonl")
if [ -n "$EXTRA_SFT" ]; then sources+=("$EXTRA_SFT"); fi
"$PYTHON" tools/merge_data.py --input "${sources[@]}" --to sharegpt --seed "$SEED" \
  --output_file "$OUT/merged.jsonl" --overwrite True
"$PYTHON" tools/dedup_data.py --input "$OUT/merged.jsonl" --output_file "$OUT/deduplicated.jsonl" \
  --removed_file "$OUT/removed.jsonl" --overwrite True
# With the local model's tokenizer: also which conversations SFT would cut at MAX_LENGTH tokens
length_check=()
if [ -z "$API_BASE" ]; then length_check=(--tokenizer "$MODEL" --template_name "$TEMPLATE" --max_length "$MAX_LENGTH"); fi
"$PYTHON" tools/validate_data.py --input "$OUT/deduplicated.jsonl" --kind sft ${length_check[@]+"${length_check[@]}"}

step "split into training and validation"
"$PYTHON" tools/split_data.py --input "$OUT/deduplicated.jsonl" --validation_ratio "$VALIDATION_RATIO" \
  --seed "$SEED" --train_file "$OUT/sft/train.jsonl" --validation_file "$OUT/sft_validation/validation.jsonl" \
  --overwrite True
tokenizer=()
if [ -z "$API_BASE" ]; then tokenizer=(--tokenizer "$MODEL"); fi
# ${a[@]+...}: an empty array under `set -u` is an error in bash before 4.4 (macOS ships 3.2)
"$PYTHON" tools/data_stats.py --input "$OUT/sft" ${tokenizer[@]+"${tokenizer[@]}"} --output_file "$OUT/stats.json" --overwrite True

step "done"
cat <<EOF
Train on it:
  TRAIN_DIR=$OUT/pretrain bash scripts/run_pt.sh
  TRAIN_DIR=$OUT/sft EVAL_DIR=$OUT/sft_validation MAX_LENGTH=$MAX_LENGTH bash scripts/run_sft.sh
EOF
