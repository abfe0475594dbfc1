#!/usr/bin/env bash
# Pretrain (MODE=pretrain, default) or fine-tune (MODE=sft) a StarCoder2 model on Megatron-Core.
# No arguments: the tiny demo model on the shipped corpus/chats, on this node's GPUs or the CPU.
#
#   MODEL_SIZE  tiny (demo); 3B 7B 15B
#
# Positions (Pai-Megatron-Patch's run_mcore order) and named flags: see examples/run_mcore.sh.
# DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_mcore.sh" starcoder2 "$@"
