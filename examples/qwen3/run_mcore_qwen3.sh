#!/usr/bin/env bash
# Pretrain (MODE=pretrain, default) or fine-tune (MODE=sft) a Qwen3 (dense) model on Megatron-Core.
# No arguments: the tiny demo model on the shipped corpus/chats, on this node's GPUs or the CPU.
#
#   MODEL_SIZE  tiny (demo); 0.6B 1.7B 4B 8B 14B 32B
#
# Positions (Pai-Megatron-Patch's run_mcore order) and named flags: see examples/run_mcore.sh.
# DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_mcore.sh" qwen3 "$@"
