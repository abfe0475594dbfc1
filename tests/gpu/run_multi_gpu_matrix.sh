#!/usr/bin/env bash
# The 2-GPU validation matrix in one call, from the repository root (see README "GPU checks"):
# DP=2, TP=2 (+SP), PP=2 (+VPP), CP=2 or its refusal, EP=2 (MoE), distributed optimizer,
# TP=2 -> PP=2 resume and DP=2 vs 1 GPU tokens/s; prints a table, writes $OUT/matrix.json.
# Wheels in .whl/ (e.g. megatron-core) are installed first when the machine lacks them.
# Without 2 GPUs it runs the CPU tiny mode (2 gloo ranks, fp32).
set -uo pipefail
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
# The rows share what is left of MATRIX_BUDGET seconds (default 560) after the set-up above.
exec "${PYTHON:-python3}" tests/gpu/run_multi_gpu_matrix.py --out "${OUT:-output/multi_gpu}" \
  --budget "$(( ${MATRIX_BUDGET:-560} - SECONDS ))" "$@"
