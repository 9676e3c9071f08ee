# Shared by the scripts in this folder. With DRY_RUN=1 they print main.py's arguments instead of running.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

main_py() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%s\n' "$@"; else python main.py "$@"; fi
}

ZERO_SHOT_TASKS=arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande

# zero_shot MODEL QUANT_CONFIG OUTPUT_FOLDER [more main.py flags]: calibrate on 32 C4 segments at
# E/W/A 4/4/4, then the reference's zero-shot tasks and WikiText-2 / C4 perplexity.
zero_shot() {
  local model=$1 config=$2 output=$3
  shift 3
  main_py --model hf-causal-experimental --model_args "pretrained=$model,use_accelerate=True,dtype=float16" \
    --tasks "$ZERO_SHOT_TASKS" --device cuda --batch_size auto --no_cache --num_fewshot 0 \
    --quant_config "$config" --qbits 4 4 4 2 2 2 --calib_size 32 --eval_ppl wikitext2 c4 \
    --output_path "$output" "$@"
}
