#!/usr/bin/env bash
# Qwen3 (Qwen3ForCausalLM) checkpoints <-> Megatron-Core.
#   hf2mcore.sh SOURCE_DIR TARGET_DIR TP PP PR DIRECTION [HF_TEMPLATE] [flags ...]
# Arguments: see ../common/convert.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/../common/convert.sh" qwen3 "$@"
