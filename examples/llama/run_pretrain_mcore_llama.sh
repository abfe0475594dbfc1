#!/usr/bin/env bash
# Pretrain a Llama-family model on Megatron-Core.
#
# No arguments: a tiny Llama (~4M parameters) on the shipped corpus and tokenizer, on the GPUs of
# this node, or on the CPU if there are none. For real runs, Pai-Megatron-Patch's positional order:
#
#   run_pretrain_mcore_llama.sh ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN \
#       PAD_LEN PR TP PP CP SP DO FL AC SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH \
#       TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH [--any-megatron-flag ...]
#
#   ENV        dsw (this node) | dlc (multi-node: WORLD_SIZE nodes, RANK, MASTER_ADDR, MASTER_PORT)
#   MODEL_SIZE tiny | 1B 3B (Llama-3.2) | 8B 70B 405B (Llama-3.1) | llama3-8B llama3-70B (Llama-3)
#              | 7B 13B llama2-70B (Llama-2) | an HF model directory
#   PR         auto | fp32 | bf16 | fp16 | fp8      AC  none | sel | full
#   SP DO FL   true | false                          DATASET_PATH  prefix or "w1 p1 w2 p2"; shipped
#   PRETRAIN_CHECKPOINT_PATH  a converted checkpoint (also gives the tokenizer) | none
#   TRAIN_TOKENS WARMUP_TOKENS  numbers, K/M/B/T suffixes allowed (e.g. 10B)
#
# DRY_RUN=1 prints the commands instead of running them. NPROC_PER_NODE overrides the process count.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO/examples/python.sh"
exec "$PYTHON" -m megatron_patch.launch llama pretrain "$@"
