#!/usr/bin/env bash
# The whole GPU check, run on a CUDA machine from the repository root (see README "GPU checks"):
#   1. the measured bf16 matmul ceiling (MFU denominator);
#   2. the main job (tiny Llama, shipped corpus) with PR=bf16;
#   3. a 1.1B Llama-shaped model, bf16, mock tokens: tokens/s and Megatron's TFLOP/s per GPU.
# Wheels in .whl/ (e.g. megatron-core) are installed first when the machine lacks them.
set -uo pipefail
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 PYTHON="${PYTHON:-python3}"
RESULTS="${OUT:-output/gpu}"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== matmul ceiling"
"$PYTHON" toolkits/benchmark/matmul_ceiling.py

echo "== main job, PR=bf16"
bash examples/llama/run_pretrain_mcore_llama.sh dsw tiny 8 16 1e-3 1e-4 128 128 bf16 1 1 1 \
  false false true none 100 shipped none 409600 40960 "$RESULTS/main" 2>&1 \
  | tee "$RESULTS/main_job.log" | grep -E "iteration|error|Error|saved"

echo "== 1.1B Llama shape (hidden 2048, 16 layers, 16 heads, 8 kv, ffn 8192, vocab 32000)"
"$PYTHON" -m torch.distributed.run --nproc-per-node 1 -m megatron_patch.training.pretrain \
  --num-layers 16 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 16 \
  --group-query-attention --num-query-groups 8 --seq-length 2048 --max-position-embeddings 2048 \
  --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
  --untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0 \
  --dataset mock --vocab-size 32000 --micro-batch-size 4 --global-batch-size 4 --bf16 \
  --lr 1e-4 --train-iters 30 --log-interval 5 --eval-iters 0 "$@" 2>&1 \
  | tee "$RESULTS/llama_1b.log" | grep -E "iteration|Error|error"
