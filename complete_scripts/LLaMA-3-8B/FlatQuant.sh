#!/usr/bin/env bash
# FlatQuant's LLaMA-3-8B W4A4KV4 row (paper / README: WikiText-2 6.98 with RTN, 6.90 with GPTQ; FP16 6.14),
# with the published script's flags. The GPTQ run reloads the matrices the RTN run trained (--reload_matrix).
# FlatQuant's protocol: 128 x 2048 WikiText-2 calibration tokens, perplexity in 2048-token windows, six
# zero-shot tasks scored by acc_norm where present (complete_scripts/collect.py --protocol flatquant).
# Extra arguments go to main.py. MODEL_ADDR overrides the model.
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL_ADDR:-meta-llama/Meta-Llama-3-8B}
TASKS=piqa,hellaswag,arc_easy,arc_challenge,winogrande,lambada_openai
RECIPE=(--w_bits 4 --a_bits 4 --k_bits 4 --k_asym --k_groupsize 128 --v_bits 4 --v_asym --v_groupsize 128
        --cali_bsz 4 --epochs 15 --flat_lr 5e-3 --nsamples 128 --lwc --lac --cali_trans --add_diag --save_matrix)
COMMON=(--model hf --model_args "$(model_args "$MODEL")" --tasks "$TASKS" --device cuda --batch_size auto
        --num_fewshot 0 --eval_ppl wikitext2 c4 --ppl_seqlen 2048 --cali_dataset wikitext2 --calib_seqlen 2048)
main_py "${COMMON[@]}" --fp_only --output_path results/LLaMA-3-8B/FlatQuant_FP16 "$@"
main_py "${COMMON[@]}" --quant_config FlatQuant_config_llama "${RECIPE[@]}" --lm_eval \
  --output_path results/LLaMA-3-8B/FlatQuant_W4A4KV4_RTN "$@"
main_py "${COMMON[@]}" --quant_config FlatQuant_config_llama "${RECIPE[@]}" --gptq --reload_matrix --lm_eval \
  --output_path results/LLaMA-3-8B/FlatQuant_W4A4KV4_GPTQ "$@"
