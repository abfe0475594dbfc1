#!/usr/bin/env bash
# Pretrain (MODE=pretrain, default) or fine-tune (MODE=sft) a Llama 2/3/3.1/3.2, CodeLlama, Yi model on Megatron-Core.
# No arguments: the tiny demo model on the shipped corpus/chats, on this node's GPUs or the CPU.
#
#   MODEL_SIZE  tiny (demo); 7B 13B llama2-70B (Llama-2); llama3-8B llama3-70B (Llama-3);
#               8B 70B 405B (Llama-3.1); 1B 3B (Llama-3.2)
#
# Positions (Pai-Megatron-Patch's run_mcore order) and named flags: see examples/run_mcore.sh.
# DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_mcore.sh" llama "$@"
