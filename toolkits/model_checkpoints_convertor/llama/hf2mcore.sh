#!/usr/bin/env bash
# Llama 1/2/3/3.1/3.2, CodeLlama, Yi (LlamaForCausalLM) checkpoints <-> Megatron-Core.
#   hf2mcore.sh SOURCE_DIR TARGET_DIR TP PP PR DIRECTION [HF_TEMPLATE] [flags ...]
# Arguments: see ../common/convert.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/../common/convert.sh" llama "$@"
