#!/usr/bin/env bash
# Supervised fine-tuning (SFT) of a Llama-family model on Megatron-Core.
#
# No arguments: the tiny Llama (~4M parameters), from random initialisation, 100 iterations on the
# shipped chat data (megatron_patch/assets/tiny_chat.jsonl) and tokenizer, samples packed into
# 128-token sequences, on the GPUs of this node or on the CPU (about 1.5 minutes on 2 CPU cores).
# Same positional order as the pretrain script:
#
#   run_finetune_mcore_llama.sh ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN \
#       PAD_LEN PR TP PP CP SP DO FL AC SAVE_INTERVAL DATASET_PATH PRETRAIN_CHECKPOINT_PATH \
#       TRAIN_TOKENS WARMUP_TOKENS OUTPUT_BASEPATH [--any-megatron-flag ...]
#
#   PAD_LEN       sequence length of the fine-tuning rows (<= SEQ_LEN); TRAIN_TOKENS and
#                 WARMUP_TOKENS count PAD_LEN tokens per sample
#   DATASET_PATH  chat/instruction data: a .jsonl/.json/.parquet file or directory (messages,
#                 ShareGPT conversations or Alpaca records), or a `megatron-patch preprocess-sft`
#                 output prefix; a weighted blend "w1 p1 w2 p2"; shipped
#   PRETRAIN_CHECKPOINT_PATH  a pretrained/converted checkpoint, loaded with --finetune | none
#   Other settings: see run_pretrain_mcore_llama.sh.
#
# Samples are packed several per sequence (SFT_PACKING=false pads one per sequence instead).
# Trailing flags go to Megatron, e.g. --sft-train-on-prompt, --sft-loss-average per-sequence,
# --on-error skip. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO/examples/python.sh"
exec "$PYTHON" -m megatron_patch.launch llama finetune "$@"
