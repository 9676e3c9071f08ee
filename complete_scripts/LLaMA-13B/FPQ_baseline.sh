#!/usr/bin/env bash
# LLaMA-13B FPQ baseline (joint format + bias search) at every Table 1 setting.
# Extra arguments go to main.py (e.g. --calib_seqlen 1024, --limit 100). MODEL_ADDR overrides the model.
source "$(dirname "$0")/../common.sh"
table_rows LLaMA-13B "${MODEL_ADDR:-huggyllama/llama-13b}" FPQ_baseline_config_llama FPQ_baseline "$@"
