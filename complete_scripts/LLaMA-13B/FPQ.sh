#!/usr/bin/env bash
# LLaMA-13B, FPQ, E/W/A = 4/4/4 (paper Table 1). Extra arguments go to main.py (e.g. --calib_seqlen 1024).
source "$(dirname "$0")/../common.sh"
zero_shot "${MODEL_ADDR:-huggyllama/llama-13b}" FPQ_config_llama results/LLaMA-13B/FPQ_W4A4E4 "$@"
