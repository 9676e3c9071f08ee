#!/usr/bin/env bash
# LLaMA-13B FPQ (search + pre-shifted exponent bias) at E/W/A 4/4/4, 4/4/8, 4/4/16, 8/8/8 (Table 1).
# Extra arguments go to main.py (e.g. --calib_seqlen 1024, --limit 100). MODEL_ADDR overrides the model.
source "$(dirname "$0")/../common.sh"
table_rows LLaMA-13B "${MODEL_ADDR:-huggyllama/llama-13b}" FPQ_config_llama FPQ "$@"
