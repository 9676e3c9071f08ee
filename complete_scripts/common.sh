# Shared by the scripts in this folder. With DRY_RUN=1 they print main.py's arguments (one per line, each
# command ended by a line "--") instead of running them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

main_py() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%s\n' "$@" --; else python main.py "$@"; fi
}

ZERO_SHOT_TASKS=arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande
# The paper's E/W/A bit settings (embedding / weight / activation), Table 1.
PAPER_SETTINGS="4/4/4 4/4/8 4/4/16 8/8/8"

# qbits E/W/A: --qbits takes W A E, then W A E exponent bits (E2M1 at 4 bits, E4M3 at 8, unused at 16).
qbits() {
  local e w a
  IFS=/ read -r e w a <<< "$1"
  exp_of() { case $1 in 4) echo 2 ;; 8) echo 4 ;; *) echo 5 ;; esac; }
  echo "$w $a $e $(exp_of "$w") $(exp_of "$a") $(exp_of "$e")"
}

model_args() { echo "pretrained=$1,use_accelerate=True,dtype=float16"; }

# zero_shot MODEL QUANT_CONFIG E/W/A OUTPUT_FOLDER [more main.py flags]: calibrate on 32 C4 segments, then
# the reference's zero-shot tasks (acc; the six-task average excludes OpenBookQA) and WikiText-2 / C4 perplexity.
zero_shot() {
  local model=$1 config=$2 ewa=$3 output=$4
  shift 4
  # shellcheck disable=SC2046
  main_py --model hf-causal-experimental --model_args "$(model_args "$model")" \
    --tasks "$ZERO_SHOT_TASKS" --device cuda --batch_size auto --no_cache --num_fewshot 0 \
    --quant_config "$config" --qbits $(qbits "$ewa") --calib_size 32 --eval_ppl wikitext2 c4 \
    --output_path "$output" "$@"
}

# table_rows MODEL_NAME MODEL QUANT_CONFIG METHOD [flags]: every paper E/W/A setting of one method.
table_rows() {
  local name=$1 model=$2 config=$3 method=$4 ewa
  shift 4
  for ewa in $PAPER_SETTINGS; do
    zero_shot "$model" "$config" "$ewa" "results/$name/${method}_EWA${ewa//\//-}" "$@"
  done
}

# full_precision MODEL_NAME MODEL [flags]: the FP16 row.
full_precision() {
  local name=$1 model=$2
  shift 2
  main_py --model hf-causal-experimental --model_args "$(model_args "$model")" --fp_only \
    --tasks "$ZERO_SHOT_TASKS" --device cuda --batch_size auto --num_fewshot 0 --eval_ppl wikitext2 c4 \
    --output_path "results/$name/FP16" "$@"
}

# reasoning MODEL_NAME MODEL TASK FEWSHOT [flags]: FP16 and FPQ E/W/A 4/4/4 and 8/8/8 on one generative or
# knowledge task; --reuse_params loads the parameters the zero-shot run saved for the same settings
# (FPQ.sh), and calibrates only when there are none.
reasoning() {
  local name=$1 model=$2 task=$3 shots=$4 ewa
  shift 4
  main_py --model hf --model_args "$(model_args "$model")" --fp_only --tasks "$task" --device cuda \
    --batch_size auto --num_fewshot "$shots" --output_path "results/$name/FP16_$task" "$@"
  for ewa in 4/4/4 8/8/8; do
    # shellcheck disable=SC2046
    main_py --model hf --model_args "$(model_args "$model")" --quant_config FPQ_config_llama \
      --qbits $(qbits "$ewa") --calib_size 32 --reuse_params --tasks "$task" --device cuda --batch_size auto \
      --num_fewshot "$shots" --output_path "results/$name/FPQ_EWA${ewa//\//-}_$task" "$@"
  done
}
