#!/usr/bin/env bash
# The whole single-GPU check, run on a CUDA machine from the repository root (README "GPU checks"):
#   1. the CUDA-only unit tests;
#   2. the main job (tiny Llama, shipped corpus) with PR=bf16: the loss must fall;
#   3. full training step against HF transformers + torch.compile (1.1B shape, bf16 and fp8);
#   4. fp8 against bf16 loss curves on the shipped corpus (FP8_SHAPE, default 1.1b; 300 steps);
#   5. moe: a ~1B-parameter Qwen3-MoE shape trained in bf16 (tokens/s, router balance);
#   6. generation: tokens/s of `megatron-patch generate`'s engine against HF generate;
#   7. grpo: rollout and training tokens/s of GRPO on a Qwen2.5-0.5B shape.
# Wheels in .whl/ (e.g. megatron-core, torchao) are installed first when the machine lacks them.
# SKIP="bench parity" skips steps by name (tests, main, bench, parity, moe, generation,
# grpo).
set -uo pipefail
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 PYTHON="${PYTHON:-python3}" CUDA_DEVICE_MAX_CONNECTIONS=1
RESULTS="${OUT:-output/gpu}"
SKIP="${SKIP:-}"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
wanted() { [[ " $SKIP " != *" $1 "* ]]; }

if wanted tests; then
  echo "== CUDA unit tests"
  "$PYTHON" -m pytest -q tests/test_gpu_fast_paths.py 2>&1 | tail -3
fi
if wanted main; then
  echo "== main job, PR=bf16"
  bash examples/llama/run_pretrain_mcore_llama.sh dsw tiny 8 16 1e-3 1e-4 128 128 bf16 1 1 1 \
    false false true none 100 shipped none 409600 40960 "$RESULTS/main" 2>&1 \
    | tee "$RESULTS/main_job.log" | grep -E "iteration +(10|50|100|150|200)/|rror|saved"
fi
if wanted bench; then
  echo "== training step vs HF + torch.compile"
  "$PYTHON" -m toolkits.benchmark.bench_training_step --shape 1.1b --seq 2048 --mbs 4 2>&1 \
    | grep -v Warning | tee "$RESULTS/bench_training_step.txt" | tail -8
fi
if wanted parity; then
  echo "== fp8 vs bf16 loss on the shipped corpus"
  "$PYTHON" -m toolkits.benchmark.fp8_loss_parity --shape "${FP8_SHAPE:-1.1b}" --iters 300 2>&1 \
    | tee "$RESULTS/fp8_loss_parity.txt" | tail -22
fi
if wanted moe; then
  echo "== MoE training, bf16"
  "$PYTHON" -m toolkits.benchmark.bench_moe_training --steps "${MOE_STEPS:-20}" 2>&1 \
    | grep -v Warning | tee "$RESULTS/bench_moe_training.txt" | tail -6
fi
if wanted generation; then
  echo "== generation vs HF generate"
  "$PYTHON" -m toolkits.benchmark.bench_generation --batches "${GEN_BATCHES:-1,32}" 2>&1 \
    | grep -v Warning | tee "$RESULTS/bench_generation.txt" | tail -6
fi
if wanted grpo; then
  echo "== GRPO rollout and training"
  "$PYTHON" -m toolkits.benchmark.bench_grpo 2>&1 | grep -v Warning \
    | tee "$RESULTS/bench_grpo.txt" | tail -4
fi
