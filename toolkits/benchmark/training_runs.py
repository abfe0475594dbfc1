"""Train through ``megatron_patch.training.pretrain`` under torchrun and read its log: the
per-iteration throughput/loss rows, each rank's peak memory and Megatron's FLOPs per token.

Shared by the training benchmarks (``bench_moe_training``, ``bench_node_scale``).
:func:`launch` runs this module as the torchrun worker: :func:`worker` trains, then prints the
figures the training log lacks for the parent to parse.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from megatron_patch.utils.torchrun import free_port
from toolkits.benchmark.bench_training_step import H100_BF16_PEAK_TFLOPS

REPO = Path(__file__).resolve().parents[2]
LOG = re.compile(r"iteration\s+(\d+)/.*?throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+) \|"
                 r" tokens per second: ([0-9.]+) \|.*? lm loss: ([0-9.E+-]+) \|"
                 r"(?:.*? load_balancing_loss: ([0-9.E+-]+) \|)?")
PEAK = re.compile(r"^PEAK_MEMORY rank=(\d+) kind=(\w+) allocated=(\d+) reserved=(\d+)$", re.M)
FLOPS = re.compile(r"^FLOPS_PER_ITERATION ([0-9.e+]+) TOKENS_PER_ITERATION (\d+)$", re.M)


def worker(argv: list[str]) -> int:
    """Under torchrun: pretrain, then print this rank's peak memory and (rank 0) Megatron's
    FLOPs per iteration unrounded (the log line has 0.1 TFLOP/s steps); the parent parses them."""
    from megatron.training import get_args
    from megatron.training.training import num_floating_point_operations

    from megatron_patch.training.pretrain import main as pretrain

    pretrain(argv)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        args = get_args()
        print(f"FLOPS_PER_ITERATION {num_floating_point_operations(args, args.global_batch_size)}"
              f" TOKENS_PER_ITERATION {args.global_batch_size * args.seq_length}", flush=True)
    if torch.cuda.is_available():
        kind, allocated = "cuda", torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        import resource

        kind = "host"
        allocated = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"PEAK_MEMORY rank={rank} kind={kind} allocated={allocated} reserved={reserved}",
          flush=True)
    return 0


def launch(nproc: int, config: dict[str, Any], flags: list[str], gpu: bool) -> dict[str, Any]:
    """Train under torchrun; per-iteration rows, per-rank peak memory, wall time, exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(free_port()), "-m", "toolkits.benchmark.training_runs",
                   "--hf-config-path", tmp, *flags]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
        if not gpu:
            env["OMP_NUM_THREADS"] = "1"
        start = time.time()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    rows = [{"iteration": int(i), "tflops_per_gpu": float(tflops), "tokens_per_s": float(tps),
             "lm_loss": float(loss), "load_balancing_loss": float(balance) if balance else None}
            for i, tflops, tps, loss, balance in LOG.findall(result.stdout)]
    peaks = {int(rank): {"kind": kind, "allocated": int(allocated), "reserved": int(reserved)}
             for rank, kind, allocated, reserved in PEAK.findall(result.stdout)}
    flops = FLOPS.search(result.stdout)
    return {"returncode": result.returncode, "seconds": time.time() - start, "rows": rows,
            "peak_memory": peaks, "tail": (result.stdout[-3000:] + result.stderr[-5000:]),
            "flops_per_token": float(flops[1]) / int(flops[2]) if flops else None}


def summarize(rows: list[dict[str, Any]], gpus: int,
              peak_tflops: float = H100_BF16_PEAK_TFLOPS) -> dict[str, Any]:
    """Medians after warm-up (the first third dropped), loss trend and router balance."""
    timed = rows[min(len(rows) - 1, max(1, len(rows) // 3)):]
    tokens = statistics.median(r["tokens_per_s"] for r in timed)
    tflops = statistics.median(r["tflops_per_gpu"] for r in timed)
    losses = [r["lm_loss"] for r in rows]
    third = max(1, len(losses) // 3)
    balance = [r["load_balancing_loss"] for r in rows if r["load_balancing_loss"] is not None]
    return {"timed_iterations": [timed[0]["iteration"], timed[-1]["iteration"]],
            "tokens_per_s": tokens, "tokens_per_s_per_gpu": tokens / gpus,
            "tflops_per_gpu": tflops, "mfu": tflops / peak_tflops,
            "loss_first": losses[0], "loss_last": losses[-1],
            "loss_finite": all(math.isfinite(v) for v in losses),
            "loss_falling": statistics.median(losses[-third:]) < statistics.median(losses[:third]),
            "load_balancing_loss": [balance[0], balance[-1]] if balance else None}


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
