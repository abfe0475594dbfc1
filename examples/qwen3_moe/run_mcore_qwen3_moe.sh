#!/usr/bin/env bash
# Pretrain (MODE=pretrain, default) or fine-tune (MODE=sft) a Qwen3-MoE model on Megatron-Core.
# No arguments: the tiny demo model on the shipped corpus/chats, on this node's GPUs or the CPU.
#
#   MODEL_SIZE  tiny (demo); 30B-A3B 235B-A22B
#
# Positions: Pai-Megatron-Patch's run_mcore order for mixture-of-experts models, with ETP EP
# after CP; named flags (--ep 8 --etp 1 ...): see examples/run_mcore.sh.
# DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_mcore.sh" qwen3_moe "$@"
