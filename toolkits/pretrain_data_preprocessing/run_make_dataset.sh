#!/usr/bin/env bash
# Raw text -> Megatron .bin/.idx indexed dataset (thin wrapper over `megatron-patch preprocess`).
#
#   bash run_make_dataset.sh INPUT OUTPUT_PREFIX [TOKENIZER_TYPE] [TOKENIZER_PATH] [WORKERS]
#
# INPUT           a .jsonl file ({"text": ...} per line), a .parquet file, or a directory of
#                 .jsonl/.txt files
# OUTPUT_PREFIX   writes OUTPUT_PREFIX_text_document.bin/.idx
# TOKENIZER_TYPE  HFTokenizer | SentencePieceTokenizer | TikTokenizer | ByteTokenizer |
#                 TinyTokenizer (default)
# TOKENIZER_PATH  tokenizer directory or file ("none" or empty for Byte/Tiny)
# WORKERS         tokenizer processes (default: number of CPU cores)
#
# Extra flags after the five positionals go to `megatron-patch preprocess` unchanged, e.g.
# --json-keys text title, --split-sentences, --on-error skip.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,15p' "$0" >&2
    exit 2
fi
INPUT=$1
OUTPUT_PREFIX=$2
TOKENIZER_TYPE=${3:-TinyTokenizer}
TOKENIZER_PATH=${4:-none}
WORKERS=${5:-$(nproc)}
shift $(( $# < 5 ? $# : 5 ))

TOKENIZER_ARGS=()
if [[ "${TOKENIZER_PATH}" != "none" && -n "${TOKENIZER_PATH}" ]]; then
    TOKENIZER_ARGS=(--tokenizer-path "${TOKENIZER_PATH}")
fi

exec "${PYTHON:-python}" -m megatron_patch.cli preprocess \
    --input "${INPUT}" \
    --output-prefix "${OUTPUT_PREFIX}" \
    --tokenizer-type "${TOKENIZER_TYPE}" \
    "${TOKENIZER_ARGS[@]}" \
    --workers "${WORKERS}" \
    --append-eod \
    "$@"
