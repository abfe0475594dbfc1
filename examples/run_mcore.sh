#!/usr/bin/env bash
# Shared body of examples/<family>/run_mcore_<family>.sh: train any registered family on
# Megatron-Core with Pai-Megatron-Patch's run_mcore positional order, or with named flags.
#
#   run_mcore_<family>.sh ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR \
#       TP PP CP [ETP EP] SP DO FL SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH \
#       VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS \
#       OUTPUT_BASEPATH [--megatron-flag ...]
#
#   ETP EP     only for mixture-of-experts families (expert tensor / expert parallel sizes)
#   SFT        true: fine-tuning (the last two counts are then iterations), false: pretraining
#   OPTIMIZER_OFFLOAD  false | true | a fraction of the optimizer states kept on the CPU
#   VALID_DATASET_PATH none (split DATASET_PATH 98/2/0) or a separate validation set
#   MODEL_SIZE a size of the family (see its script) or an HF model directory (its config.json);
#              without it, a --load checkpoint (converted or trained) gives model and tokenizer
#   Other positions: see run_pretrain_mcore_llama.sh.
#
# The same with named flags (they may also follow positions, and win over them):
#   run_mcore_<family>.sh --model-size 8B --tp 2 --pp 2 --vpp 2 --cp 1 --ep 1 --etp 1 --sp \
#       --do --ac sel --fl --pr bf16 --mbs 1 --gbs 256 --seq-len 8192 --lr 3e-4 --min-lr 3e-5 \
#       --train-iters 5000 --warmup-iters 100 --data-path /data/web_text_document \
#       --load /ckpt/llama3.1-8b-mcore --save /ckpt/run1 [--packing false] [--optimizer-offload 1]
#
# MODE=pretrain (default) | sft picks the entry point when neither SFT nor --mode is given.
# Invalid combinations are reported before anything starts; DRY_RUN=1 prints the commands.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/examples/python.sh"
FAMILY="$1"
shift
exec "$PYTHON" -m megatron_patch.launch "$FAMILY" mcore "$@"
