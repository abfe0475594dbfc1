#!/usr/bin/env bash
# GRPO (group-relative policy optimization) of a Llama-family model on Megatron-Core.
#
# No arguments: a tiny random Llama (~4M parameters) on the shipped data
# (megatron_patch/assets/tiny_sum_prompts.jsonl: "a+b=" with rule-based rewards), on the GPUs of
# this node or on the CPU. For a real run start from an SFT checkpoint:
#
#   LOAD=/ckpt/llama-sft TP=2 GBS=64 MBS=4 LR=5e-7 ITERS=1000 SEQ_LEN=2048 \
#       DATA=/data/gsm8k.jsonl bash examples/llama/run_grpo_mcore_llama.sh --reward-fn rlhf.rewards:exact_match
#
# Settings (environment) and defaults: python -m rlhf.launch (rlhf/launch.py); trailing flags go
# to python -m rlhf.grpo and Megatron. DRY_RUN=1 prints the command.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO/examples/python.sh"
exec "$PYTHON" -m rlhf.launch llama grpo "$@"
