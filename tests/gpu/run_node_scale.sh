#!/usr/bin/env bash
# Issue 12's node-scale runs, from the repository root (README "GPU checks"): a random
# Llama-3.1-8B shape in bf16 and in fp8, and a Qwen3-30B-A3B shape at EP=8 in bf16, seq 8192,
# layouts from `megatron-patch plan` for 8 x 80 GiB GPUs. With 8 GPUs each is the real run;
# with fewer, the one-GPU proxy of a target GPU and the extrapolation (needs ~106 GiB: H200).
# STEPS (default 50) iterations each; RUNS picks runs by name (llama-bf16 llama-fp8 moe-bf16).
# Each run gets what is left of BUDGET seconds (default 540) shared by the runs still to go.
# Estimated on one H200 (proxies: ~0.9 PFLOP per step each, 4 x 8192 tokens): llama-bf16
# ~2.3 s/step at 40% MFU, llama-fp8 ~2 s, moe-bf16 ~4.5 s (full recompute, ~20% MFU), plus
# ~1 min start-up each: STEPS=50 ~ 11 min, STEPS=20 ~ 6 min.
# Logs and JSON go to $OUT (default output/node_scale); the last lines are one summary table.
set -uo pipefail
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 PYTHON="${PYTHON:-python3}"
RESULTS="${OUT:-output/node_scale}" STEPS="${STEPS:-50}" BUDGET="${BUDGET:-540}"
RUNS="${RUNS:-llama-bf16 llama-fp8 moe-bf16}"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
declare -A ARGS=(
  [llama-bf16]="--model llama3.1-8b --pr bf16"
  [llama-fp8]="--model llama3.1-8b --pr fp8"
  [moe-bf16]="--model qwen3-30b-a3b --pr bf16 --ep 8"
)
read -ra names <<< "$RUNS"
left=${#names[@]}
for name in "${names[@]}"; do
  seconds=$(( (BUDGET - SECONDS) / left )); left=$(( left - 1 ))
  echo "== $name: ${ARGS[$name]} --steps $STEPS (at most ${seconds} s)"
  # shellcheck disable=SC2086
  timeout "$seconds" "$PYTHON" -m toolkits.benchmark.bench_node_scale ${ARGS[$name]} \
    --target-gpus 8 --seq 8192 --steps "$STEPS" --out "$RESULTS/$name.json" 2>&1 \
    | grep -v Warning | tee "$RESULTS/$name.log" | grep -v "^  iteration" \
    || echo "$name: failed or out of time (log: $RESULTS/$name.log)"
done
"$PYTHON" - "$RESULTS" $RUNS <<'EOF'
import json, sys
from pathlib import Path
print(f"{'run':<11}{'branch':<7}{'tok/s/GPU':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>9}"
      f"{'plan GiB':>9}  loss first -> last")
for name in sys.argv[2:]:
    path = Path(sys.argv[1]) / f"{name}.json"
    if not path.is_file():
        print(f"{name:<11}missing")
        continue
    report = json.loads(path.read_text())
    run = report["runs"][-1]
    figures = run.get("extrapolated") or run["summary"]
    peak = max(p["allocated"] for p in run["peak_memory"].values()) / 2**30
    summary = run["summary"]
    print(f"{name:<11}{run['branch']:<7}{figures['tokens_per_s_per_gpu']:>10.0f}"
          f"{figures['tflops_per_gpu']:>9.1f}{figures['mfu']:>7.1%}{peak:>9.1f}"
          f"{report['plan_memory_per_gpu_gib']['total']:>9.1f}  {summary['loss_first']:.3f} -> "
          f"{summary['loss_last']:.3f}")
print("proxy rows: extrapolated to 8 GPUs; peak GiB is the proxy's own (one GPU's share at "
      "TP=1, full optimizer states), plan GiB the memory model's for a target GPU")
EOF
