#!/usr/bin/env bash
# Multimodal SFT of a LLaVA model (LlavaForConditionalGeneration) on Megatron-Core.
#
# No arguments: a random demo LLaVA (CLIP 28px tower + 2-layer Llama, ~1M parameters, built from
# the transformers config classes) is written, converted, and fine-tuned on the shipped
# images and captions (megatron_patch/assets/tiny_vlm) on the CPU or the GPUs of this node;
# the loss falls from ~7.5 to ~3 in 40 iterations (about a minute on 2 CPU cores).
#
# Real runs: convert the model first, then name it and the data (environment variables):
#   megatron-patch convert hf-to-mcore --hf-dir llava-1.5-7b-hf --out ckpt/llava --tp 2
#   CHECKPOINT=ckpt/llava DATA=chat.jsonl TP=2 PP=1 MBS=1 GBS=128 SEQ_LEN=2048 LR=2e-5 \
#       TRAIN_ITERS=5000 TOKENIZER=HFTokenizer bash examples/llava/run_mcore_llava.sh \
#       --freeze-ViT --bf16
# DATA is a JSONL file of ShareGPT conversations with <image> placeholders and "images" paths
# (relative to the file). Further arguments go to Megatron (--freeze-LM, --freeze-ViT,
# --freeze-projector, --bf16, ...). The run resumes from its own checkpoints in OUTPUT.
# Not supported yet: sequence parallelism (Megatron-Core's LLaVA needs Transformer Engine for
# it), context parallelism, virtual pipeline stages, packing.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$REPO/examples/python.sh"
OUTPUT="${OUTPUT:-$REPO/output/llava_demo}"
DATA="${DATA:-$REPO/megatron_patch/assets/tiny_vlm/tiny_vlm_chat.jsonl}"
if [[ -z "${CHECKPOINT:-}" ]]; then
  CHECKPOINT="$OUTPUT/demo-mcore"
  if [[ ! -f "$CHECKPOINT/latest_checkpointed_iteration.txt" ]]; then
    "$PYTHON" -m megatron_patch.models.llava.demo "$OUTPUT/demo-hf"
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
