#!/usr/bin/env bash
# Qwen1.5-MoE / Qwen2-MoE (Qwen2MoeForCausalLM) checkpoints <-> Megatron-Core.
#   hf2mcore.sh SOURCE_DIR TARGET_DIR TP PP PR DIRECTION [HF_TEMPLATE] [flags ...]
# Arguments: see ../common/convert.sh; expert layout flags: --ep N --etp N (e.g. with
# --format legacy, which fixes the layout; torch_dist loads at any TP/PP/EP/ETP).
exec "$(dirname "${BASH_SOURCE[0]}")/../common/convert.sh" qwen2_moe "$@"
