#!/usr/bin/env bash
# Multimodal SFT of a Qwen2.5-VL or Qwen2-VL model (Qwen2_5_VLForConditionalGeneration,
# Qwen2VLForConditionalGeneration) on Megatron-Core.
#
# No arguments: a random demo Qwen2.5-VL (2-layer windowed/full ViT on 4x4 patches merged 2x2 +
# 2-layer Qwen2 with M-RoPE, ~1M parameters, built from the transformers config classes) is
# written, converted, and fine-tuned on the shipped images (32x32 and other sizes, each seen at
# its own resolution) and captions (megatron_patch/assets/tiny_vlm) on the CPU or the GPUs of
# this node; the loss falls from ~7.5 to ~3 in 40 iterations (about a minute on 2 CPU cores).
#
# Real runs: convert the model first, then name it and the data (environment variables):
#   megatron-patch convert hf-to-mcore --hf-dir Qwen2.5-VL-7B-Instruct --out ckpt/qwen2.5-vl --tp 2
#   CHECKPOINT=ckpt/qwen2.5-vl DATA=chat.jsonl TP=2 PP=1 MBS=1 GBS=128 SEQ_LEN=4096 LR=1e-5 \
#       TRAIN_ITERS=5000 TOKENIZER=HFTokenizer bash examples/qwen2_5_vl/run_mcore_qwen2_5_vl.sh \
#       --freeze-ViT --bf16 --sft-packing --vlm-max-pixels 1003520
# DATA is a JSONL file of ShareGPT conversations with <image> placeholders and "images" paths
# (relative to the file). Images keep their aspect ratio, resized to multiples of 28 pixels
# within the checkpoint's preprocessor_config.json min/max pixels (--vlm-min-pixels,
# --vlm-max-pixels override them). Further arguments go to Megatron (--freeze-LM, --freeze-ViT,
# --freeze-projector, --sft-packing, --bf16, ...). The run resumes from its own checkpoints in
# OUTPUT. Variables: CHECKPOINT DATA OUTPUT TP PP MBS GBS SEQ_LEN LR MIN_LR WARMUP_ITERS
# TRAIN_ITERS LOG_INTERVAL TOKENIZER TOKENIZER_PATH HF_CONFIG NPROC_PER_NODE MASTER_PORT.
# Sequence parallelism (--sequence-parallel with TP > 1) works; not supported yet: context
# parallelism, virtual pipeline stages, videos.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_mcore_vlm.sh" \
  megatron_patch.models.qwen2_vl.demo qwen2_5_vl_demo "$@"
