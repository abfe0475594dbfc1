#!/usr/bin/env bash
# LoRA fine-tuning (SFT) of a Llama-family model on Megatron-Core: adapters of rank LORA_RANK
# (alpha 2 * rank) on the attention and MLP linears of a frozen model.
#
# No arguments: a tiny demo on the shipped chat data. Its base is the tiny Llama that
# run_pretrain_mcore_llama.sh trains (run once first, 100 iterations, into
# output/checkpoint/lora-demo-base); then 100 LoRA iterations on the chat data, the adapters
# (only) saved under output/checkpoint/. Export them for Hugging Face PEFT with
#   megatron-patch export-lora --load output/checkpoint/<run> --out ADAPTER_DIR
#
# Arguments: those of run_finetune_mcore_llama.sh (its positions and named flags); the base is
# PRETRAIN_CHECKPOINT_PATH / --load (a converted or trained checkpoint). LORA_RANK=R (or --lora R)
# sets the rank (default 8); --lora-alpha A, --lora-dropout P and --lora-target-modules
# linear_qkv,linear_proj,linear_fc1,linear_fc2 go to Megatron. DRY_RUN=1 prints the commands.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO/examples/python.sh"
if [ "$#" -eq 0 ]; then
    BASE="output/checkpoint/lora-demo-base"
    if [ ! -f "$BASE/latest_checkpointed_iteration.txt" ] && [ -z "${DRY_RUN:-}" ]; then
        echo "LoRA demo: training its tiny base model first ($BASE)"
        bash "$REPO/examples/llama/run_pretrain_mcore_llama.sh" --train-iters 100 --save "$BASE"
    fi
    set -- --model-size tiny --load "$BASE" --train-iters 100 --lr 1e-3 --min-lr 1e-4
fi
exec "$PYTHON" -m megatron_patch.launch llama finetune --lora "${LORA_RANK:-8}" "$@"
