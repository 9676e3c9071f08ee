#!/usr/bin/env bash
# LLaMA-3-8B (not in the reference code): FP16, then FPQ at every Table 1 setting.
# Extra arguments go to main.py (e.g. --calib_seqlen 1024, --limit 100). MODEL_ADDR overrides the model.
source "$(dirname "$0")/../common.sh"
full_precision LLaMA-3-8B "${MODEL_ADDR:-meta-llama/Meta-Llama-3-8B}" "$@"
table_rows LLaMA-3-8B "${MODEL_ADDR:-meta-llama/Meta-Llama-3-8B}" FPQ_config_llama FPQ "$@"
