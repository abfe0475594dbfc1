#!/usr/bin/env bash
# Offline text generation from a Megatron checkpoint of a Llama-family model.
#
# No arguments: generates for a few shipped prompts with the tiny pretraining demo's newest
# checkpoint (run_pretrain_mcore_llama.sh with no arguments), or with a tiny random Llama built
# from the shipped tokenizer if that has not been run. For real checkpoints, Pai-Megatron-Patch's
# positional order (run_text_generation_megatron_*.sh):
#
#   run_text_generation_mcore_llama.sh ENV CHECKPOINT_PATH MODEL_SIZE TP BS SEQ_LEN PAD_LEN \
#       EXTRA_VOCAB_SIZE PR TOP_K INPUT_SEQ_LEN OUTPUT_SEQ_LEN INPUT_FILE OUTPUT_FILE TOP_P \
#       TEMPERATURE REPETITION_PENALTY [--any-generate-or-megatron-flag ...]
#
#   ENV              dsw | dlc (generation runs on this node: TP x PP processes)
#   CHECKPOINT_PATH  converted (`megatron-patch convert hf-to-mcore`) or saved by training
#   MODEL_SIZE PAD_LEN EXTRA_VOCAB_SIZE  accepted for compatibility; the checkpoint decides them
#   BS               prompts per batch          SEQ_LEN  prompt + completion tokens at most
#   PR               bf16 | fp16 | fp32 | auto  INPUT_SEQ_LEN  longest prompt (longer: an error)
#   TOP_K TOP_P      0 disables each (TOP_K=1 is greedy)   OUTPUT_SEQ_LEN  new tokens at most
#   INPUT_FILE       one prompt per line: text, {"prompt": ...} or {"messages": [...]}
#   OUTPUT_FILE      JSONL completions in input order (written atomically)
#
# PP=<n> in the environment adds pipeline parallelism. Trailing flags go to
# `megatron-patch generate` (e.g. --greedy, --chat, --stop STR, --on-error skip, --seed N) and
# from there to Megatron. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO/examples/python.sh"

if [[ $# -eq 0 ]]; then
  exec "$PYTHON" -m megatron_patch.generation.demo
fi
if [[ $# -lt 17 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
  echo "error: expected 17 positional arguments (or none), got $#" >&2
  exit 2
fi
ENV=$1 CHECKPOINT_PATH=$2 TP=$4 BS=$5 SEQ_LEN=$6 PR=$9 TOP_K=${10} INPUT_SEQ_LEN=${11}
OUTPUT_SEQ_LEN=${12} INPUT_FILE=${13} OUTPUT_FILE=${14} TOP_P=${15} TEMPERATURE=${16}
REPETITION_PENALTY=${17}
shift 17
case "$ENV" in dsw|dlc) ;; *) echo "error: ENV=$ENV; expected dsw or dlc" >&2; exit 2 ;; esac
if [[ "$TOP_P" == 0 || "$TOP_P" == 0.0 ]]; then TOP_P=1.0; fi  # Pai: 0 disables top-p

command=("$PYTHON" -m megatron_patch.cli generate --load "$CHECKPOINT_PATH"
  --tp "$TP" --pp "${PP:-1}" --batch-size "$BS" --max-seq-length "$SEQ_LEN" --dtype "$PR"
  --top-k "$TOP_K" --top-p "$TOP_P" --temperature "$TEMPERATURE"
  --repetition-penalty "$REPETITION_PENALTY" --max-prompt-tokens "$INPUT_SEQ_LEN"
  --max-new-tokens "$OUTPUT_SEQ_LEN" --input "$INPUT_FILE" --output "$OUTPUT_FILE" "$@")
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
exec "${command[@]}"
