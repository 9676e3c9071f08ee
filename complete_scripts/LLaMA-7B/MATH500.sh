#!/usr/bin/env bash
# LLaMA-7B MATH500 (minerva_math500, 4 shots): FP16 and FPQ 4/4/4, 8/8/8.
# Extra arguments go to main.py (e.g. --calib_seqlen 1024, --limit 100). MODEL_ADDR overrides the model.
source "$(dirname "$0")/../common.sh"
reasoning LLaMA-7B "${MODEL_ADDR:-huggyllama/llama-7b}" minerva_math500 4 "$@"
