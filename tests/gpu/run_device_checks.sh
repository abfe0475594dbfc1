#!/usr/bin/env bash
# The whole single-GPU check, run on a CUDA machine from the repository root (README "GPU checks"),
# once per software configuration: "te" (Transformer Engine installed) and "torch" (without it).
#   journeys: every user journey through the public commands, one table (tests/gpu/journeys.py);
#   tests:    the CUDA-only unit tests;
#   fidelity: 300-step bf16 and fp8 loss curves of the 1.1B shape on the shipped corpus per
#             configuration (fp8_loss_parity), and the bf16 curves of "te" and "torch" compared
#             step by step (within 1% after step 50), beside each configuration's bf16 curve
#             against a rerun of itself (the noise floor; FIDELITY_RERUN=0 skips the reruns);
#   bench:    full training step against HF transformers + torch.compile (1.1B shape, bf16, fp8);
#   moe, generation, grpo: the MoE, generation and GRPO benchmarks;
#   lora:     LoRA against full fine-tuning (3B at seq 2048, the 8B one-GPU proxy at seq 8192);
#   eval:     benchmark evaluation (megatron-patch eval's model) against lm-eval's HF backend.
# Wheels in .whl/ (megatron-core, torchao, and Transformer Engine with its pydantic needs) are
# installed into /tmp/site-te (all of them) and /tmp/site-torch (all but transformer_engine),
# with those in .whl-eval/ (lm-eval and the packages it needs there) into both;
# without a TE wheel only "torch" runs (REUSE=1 keeps directories an earlier run installed).
# CONFIGS="torch" picks configurations, SKIP="bench moe" skips steps by name, FIDELITY_FP8=0
# trains the bf16 curves only, JOURNEYS_DEADLINE=SECONDS bounds the journeys, RESULTS_DIR (default output/gpu) keeps the results.
set -uo pipefail
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
RESULTS="${RESULTS_DIR:-output/gpu}"
SKIP="${SKIP:-}"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
wanted() { [[ " $SKIP " != *" $1 "* ]]; }

declare -A SITE
if [[ -d .whl ]]; then
  install() {  # install() DIR WHEEL...: a fresh directory per configuration (REUSE=1 keeps one)
    [[ "${REUSE:-0}" == 1 && -d "$1" ]] && return 0
    rm -rf "$1" && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$1" "${@:2}"
  }
  mapfile -t for_eval < <(ls .whl-eval/*.whl 2>/dev/null)
  mapfile -t without_te < <(ls .whl/*.whl | grep -v /transformer_engine-)
  install /tmp/site-torch "${without_te[@]}" "${for_eval[@]}" && SITE[torch]=/tmp/site-torch
  if ls .whl/transformer_engine-*.whl >/dev/null 2>&1; then
    install /tmp/site-te .whl/*.whl "${for_eval[@]}" && SITE[te]=/tmp/site-te
  fi
else
  SITE[installed]=/nonexistent  # the machine's own packages
fi
CONFIGS="${CONFIGS:-$(printf '%s\n' "${!SITE[@]}" | sort | tr '\n' ' ')}"
echo "configurations: $CONFIGS"
with() {  # with CONFIG COMMAND...: run with that configuration's packages first on the path
  PYTHONPATH="${SITE[$1]}:$PWD" "${@:2}"
}
curves() {  # curves CONFIG NAME ARGS...: the fidelity run's loss curves into curves_NAME.json
  with "$1" python3 -m toolkits.benchmark.fp8_loss_parity --shape "${FP8_SHAPE:-1.1b}" \
    --mbs "${FP8_MBS:-4}" --iters "${FP8_ITERS:-300}" --curves "$RESULTS/curves_$2.json" "${@:3}"
}

if wanted journeys; then
  echo "== user journeys"
  args=()
  for c in $CONFIGS; do args+=(--config "$c=${SITE[$c]}"); done
  python3 -m tests.gpu.journeys "${args[@]}" --out "$RESULTS/journeys" \
    ${JOURNEYS_DEADLINE:+--deadline "$JOURNEYS_DEADLINE"} 2>&1 \
    | tee "$RESULTS/journeys.txt"
fi
for c in $CONFIGS; do
  if wanted tests; then
    echo "== [$c] CUDA unit tests"
    with "$c" python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fast_paths.py \
      tests/test_wgrad_accumulation.py 2>&1 | tail -3
  fi
  if wanted fidelity; then
    echo "== [$c] bf16 and fp8 loss curves on the shipped corpus"
    curves "$c" "$c" $([[ "${FIDELITY_FP8:-1}" == 0 ]] && echo --no-fp8) 2>&1 \
      | tee "$RESULTS/fp8_loss_parity_$c.txt" | tail -22
    if [[ "${FIDELITY_RERUN:-1}" == 1 ]]; then  # the same bf16 run again: the noise floor
      curves "$c" "${c}_rerun" --no-fp8 2>&1 | tail -1
    fi
  fi
  if wanted bench; then
    echo "== [$c] training step vs HF + torch.compile"
    with "$c" python3 -m toolkits.benchmark.bench_training_step --shape 1.1b --seq 2048 --mbs 4 \
      2>&1 | grep -v Warning | tee "$RESULTS/bench_training_step_$c.txt" | tail -8
  fi
  if wanted moe; then
    echo "== [$c] MoE training, bf16"
    with "$c" python3 -m toolkits.benchmark.bench_moe_training --steps "${MOE_STEPS:-20}" 2>&1 \
      | grep -v Warning | tee "$RESULTS/bench_moe_training_$c.txt" | tail -6
  fi
  if wanted generation; then
    echo "== [$c] generation vs HF generate"
    with "$c" python3 -m toolkits.benchmark.bench_generation --batches "${GEN_BATCHES:-1,32}" \
      2>&1 | grep -v Warning | tee "$RESULTS/bench_generation_$c.txt" | tail -6
  fi
  if wanted grpo; then
    echo "== [$c] GRPO rollout and training"
    with "$c" python3 -m toolkits.benchmark.bench_grpo 2>&1 | grep -v Warning \
      | tee "$RESULTS/bench_grpo_$c.txt" | tail -4
  fi
  if wanted lora; then
    echo "== [$c] LoRA against full fine-tuning"
    for shape in "3b --seq 2048 --mbs 2" "8b-proxy --seq 8192 --mbs 1"; do
      with "$c" python3 -m toolkits.benchmark.bench_lora --shape $shape 2>&1 \
        | grep -v Warning | tee -a "$RESULTS/bench_lora_$c.txt" | tail -4
    done
  fi
  if wanted eval; then
    echo "== [$c] benchmark evaluation against lm-eval's HF backend"
    with "$c" python3 -m toolkits.benchmark.bench_eval --shape 1.1b --batch-size 32 2>&1 \
      | grep -v Warning | tee "$RESULTS/bench_eval_$c.txt" | tail -4
  fi
done
compare_curves() {  # compare_curves A B TITLE: the bf16 curves of two runs, step by step
  [[ -f "$RESULTS/curves_$1.json" && -f "$RESULTS/curves_$2.json" ]] || return 0
  echo "== $3"
  with "${CONFIGS%% *}" python3 -m toolkits.benchmark.fp8_loss_parity \
    --compare "$RESULTS/curves_$1.json" "$RESULTS/curves_$2.json" --after 50 2>&1 | tee "$RESULTS/$1_vs_$2.txt"
}
if wanted fidelity; then
  compare_curves te torch "bf16 with Transformer Engine against bf16 without it"
  for c in $CONFIGS; do compare_curves "$c" "${c}_rerun" "[$c] bf16 against a rerun of it"; done
fi
