#!/usr/bin/env bash
# Shared body of the vision-language launchers (examples/llava/run_mcore_llava.sh,
# examples/qwen2_5_vl/run_mcore_qwen2_5_vl.sh; their headers document the variables):
#   run_mcore_vlm.sh DEMO_MODULE DEMO_NAME [Megatron flags ...]
# Without CHECKPOINT, `python -m DEMO_MODULE DIR` writes the family's random demo model, which is
# converted and fine-tuned on the shipped images and captions; OUTPUT defaults to
# output/DEMO_NAME. With CHECKPOINT (a converted model), DATA and the other variables: a real run.
set -euo pipefail
DEMO_MODULE="$1"; DEMO_NAME="$2"; shift 2
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/examples/python.sh"
OUTPUT="${OUTPUT:-$REPO/output/$DEMO_NAME}"
DATA="${DATA:-$REPO/megatron_patch/assets/tiny_vlm/tiny_vlm_chat.jsonl}"
if [[ -z "${CHECKPOINT:-}" ]]; then
  CHECKPOINT="$OUTPUT/demo-mcore"
  if [[ ! -f "$CHECKPOINT/latest_checkpointed_iteration.txt" ]]; then
    "$PYTHON" -m "$DEMO_MODULE" "$OUTPUT/demo-hf"
    "$PYTHON" -m megatron_patch.cli convert hf-to-mcore --hf-dir "$OUTPUT/demo-hf" \
      --out "$CHECKPOINT" --no-progress
  fi
fi
SAVE="$OUTPUT/checkpoint"
if [[ -f "$SAVE/latest_checkpointed_iteration.txt" ]]; then
  LOAD=(--load "$SAVE")
else
  LOAD=(--load "$CHECKPOINT" --finetune --no-load-optim --no-load-rng)
fi
if [[ -n "${NPROC_PER_NODE:-}" ]]; then NPROC="$NPROC_PER_NODE"
else NPROC=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))"); fi
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" \
  --master-port "${MASTER_PORT:-$("$PYTHON" -c "import socket; s = socket.socket(); \
s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}" \
  -m megatron_patch.training.vlm "${LOAD[@]}" --save "$SAVE" --save-interval 1000 \
  --hf-config-path "${HF_CONFIG:-$CHECKPOINT}" \
  --data-path "$DATA" --patch-tokenizer-type "${TOKENIZER:-TinyTokenizer}" \
  --patch-tokenizer-path "${TOKENIZER_PATH:-$CHECKPOINT}" \
  --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}" \
  --micro-batch-size "${MBS:-2}" --global-batch-size "${GBS:-4}" --seq-length "${SEQ_LEN:-96}" \
  --lr "${LR:-1e-3}" --min-lr "${MIN_LR:-1e-4}" --lr-decay-style cosine \
  --lr-warmup-iters "${WARMUP_ITERS:-5}" --train-iters "${TRAIN_ITERS:-40}" \
  --weight-decay 0.0 --clip-grad 1.0 --log-interval "${LOG_INTERVAL:-5}" --eval-iters 0 \
  --attention-dropout 0 --hidden-dropout 0 "$@"
