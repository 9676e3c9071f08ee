#!/usr/bin/env bash
# LLaMA-13B full precision (paper Table 1, first row).
# Extra arguments go to main.py (e.g. --calib_seqlen 1024, --limit 100). MODEL_ADDR overrides the model.
source "$(dirname "$0")/../common.sh"
full_precision LLaMA-13B "${MODEL_ADDR:-huggyllama/llama-13b}" "$@"
