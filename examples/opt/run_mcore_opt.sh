#!/usr/bin/env bash
# Pretrain (MODE=pretrain, default) or fine-tune (MODE=sft) a OPT / Galactica model on Megatron-Core.
# No arguments: the tiny demo model on the shipped corpus/chats, on this node's GPUs or the CPU.
#
#   MODEL_SIZE  tiny (demo); 125M 1.3B 2.7B 6.7B 13B 30B 66B
#
# Positions (Pai-Megatron-Patch's run_mcore order) and named flags: see examples/run_mcore.sh.
# DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_mcore.sh" opt "$@"
