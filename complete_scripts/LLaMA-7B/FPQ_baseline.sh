#!/usr/bin/env bash
# LLaMA-7B, FPQ_baseline, E/W/A = 4/4/4 (paper Table 1). Extra arguments go to main.py (e.g. --calib_seqlen 1024).
source "$(dirname "$0")/../common.sh"
zero_shot "${MODEL_ADDR:-huggyllama/llama-7b}" FPQ_baseline_config_llama results/LLaMA-7B/FPQ_baseline_W4A4E4 "$@"
