"""Run megatron-patch entry points in subprocesses (torchrun for several ranks) and parse logs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from megatron_patch.utils.torchrun import free_port

REPO = Path(__file__).resolve().parents[1]
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.E+-]+) \|")

TINY_MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--attention-dropout", "0", "--hidden-dropout", "0",
]
MOCK_DATA = ["--dataset", "mock", "--vocab-size", "256", "--make-vocab-size-divisible-by", "128"]


def run_module(module: str, args: list[str], nproc: int = 1, timeout: int = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` under torchrun with ``nproc`` ranks; raise on failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", module, *args]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env=full_env)
    if result.returncode != 0:
        raise AssertionError(
            f"{module} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-6000:]}"
        )
    return result


def losses(output: str) -> dict[int, float]:
    """Iteration -> lm loss from Megatron-format log lines."""
    return {int(i): float(v) for i, v in LOSS_LINE.findall(output)}


def pretrain(args: list[str], nproc: int = 1, **kwargs) -> dict[int, float]:
    """Run the pretrain entry point and return its per-iteration losses."""
    result = run_module("megatron_patch.training.pretrain", args, nproc=nproc, **kwargs)
    found = losses(result.stdout)
    assert found, f"no loss lines in output:\n{result.stdout[-3000:]}"
    return found


def serve_cases(cases_file: str, out_file: str, evaluate: Callable[[dict], object]) -> None:
    """Worker side of a multi-case launch: ``evaluate`` every case of the JSON ``cases_file`` on
    every rank (rank 0 prints each case's time); rank 0 writes ``{id: result}`` to ``out_file``."""
    import json
    import time

    import torch

    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        start = time.perf_counter()
        results[case["id"]] = evaluate(case)
        if torch.distributed.get_rank() == 0:
            print(f"PARITY {case['id']} {time.perf_counter() - start:.1f}s", flush=True)
    if torch.distributed.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results, indent=2))

