#!/usr/bin/env bash
# LLaMA-2-7B (not in the reference code): FP16, then FPQ at every Table 1 setting.
# Extra arguments go to main.py (e.g. --calib_seqlen 1024, --limit 100). MODEL_ADDR overrides the model.
source "$(dirname "$0")/../common.sh"
full_precision LLaMA-2-7B "${MODEL_ADDR:-meta-llama/Llama-2-7b-hf}" "$@"
table_rows LLaMA-2-7B "${MODEL_ADDR:-meta-llama/Llama-2-7b-hf}" FPQ_config_llama FPQ "$@"
