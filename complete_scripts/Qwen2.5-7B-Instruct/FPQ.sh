#!/usr/bin/env bash
# Qwen2.5-7B-Instruct (not in the reference code): FP16, then FPQ at every Table 1 setting.
# Extra arguments go to main.py (e.g. --calib_seqlen 1024, --limit 100). MODEL_ADDR overrides the model.
source "$(dirname "$0")/../common.sh"
full_precision Qwen2.5-7B-Instruct "${MODEL_ADDR:-Qwen/Qwen2.5-7B-Instruct}" "$@"
table_rows Qwen2.5-7B-Instruct "${MODEL_ADDR:-Qwen/Qwen2.5-7B-Instruct}" FPQ_config_llama FPQ "$@"
