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
exec bash "$(dirname "${BASH_SOURCE[0]}")/../run_mcore_vlm.sh" megatron_patch.models.llava.demo \
  llava_demo "$@"
