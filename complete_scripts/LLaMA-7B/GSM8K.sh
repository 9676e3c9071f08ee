#!/usr/bin/env bash
# LLaMA-7B GSM8K (chain of thought, 8 shots in the task YAML): FP16 and FPQ 4/4/4, 8/8/8.
# Extra arguments go to main.py (e.g. --calib_seqlen 1024, --limit 100). MODEL_ADDR overrides the model.
source "$(dirname "$0")/../common.sh"
reasoning LLaMA-7B "${MODEL_ADDR:-huggyllama/llama-7b}" gsm8k_cot 8 "$@"
