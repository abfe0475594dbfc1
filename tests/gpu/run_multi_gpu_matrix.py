"""The multi-GPU validation matrix in one run, printed as a table (README "GPU checks").

    python tests/gpu/run_multi_gpu_matrix.py            # 2 CUDA GPUs: bf16, nccl, 50 steps
    python tests/gpu/run_multi_gpu_matrix.py --tiny     # CPU: fp32, 2 gloo ranks, tiny model

Every layout trains the same model from the same (layout-invariant) initialisation on the same
mock tokens and global batch, and its per-step losses are compared with the single-process run:
DP=2, DP=2 with the distributed optimizer, TP=2 with and without SP, PP=2, PP=2 with VPP=2,
CP=2 where the launcher accepts it (otherwise its refusal is shown), and EP=2 on a
mixture-of-experts model against its own single-process run. A checkpoint written at TP=2
halfway resumes at PP=2 (torch_dist resharding) and must continue with the TP=2 run's losses.
Last, tokens/s of a 1.1B Llama shape (hidden 2048, 16 layers, 16 heads, 8 kv, ffn 8192, vocab
32000, seq 2048) on one GPU and at DP=2 (goal: >= 1.9x).

Losses must agree within ``--rtol`` (bf16: 2.5e-2 relative, fp32: 1e-5). Logs and a JSON
summary go to ``--out`` (default ``$OUT`` or ``output/multi_gpu``). Rows not started within
``--budget`` seconds are reported as skipped, so the table always prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.launch import free_port, losses  # noqa: E402

TOKENS_PER_SECOND = re.compile(r"tokens per second: ([0-9.]+)")

GPU_MODEL = ["--num-layers", "8", "--hidden-size", "1024", "--ffn-hidden-size", "2816",
             "--num-attention-heads", "16", "--group-query-attention", "--num-query-groups", "8",
             "--seq-length", "1024", "--max-position-embeddings", "1024"]
TINY_MODEL = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
              "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
              "--seq-length", "32", "--max-position-embeddings", "32"]
LLAMA = ["--model-family", "llama", "--normalization", "RMSNorm", "--swiglu",
         "--position-embedding-type", "rope", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
         "--hidden-dropout", "0"]
SHAPE_1B = ["--num-layers", "16", "--hidden-size", "2048", "--ffn-hidden-size", "8192",
            "--num-attention-heads", "16", "--group-query-attention", "--num-query-groups", "8",
            "--seq-length", "2048", "--max-position-embeddings", "2048"]


@dataclass
class Row:
    """One line of the table."""

    name: str
    nproc: int
    args: list[str]
    reference: str | None = "ref-dense"  # the row it is compared with
    after: int = 0  # compare the steps after this one (a resumed run)
    losses: dict[int, float] = field(default_factory=dict)
    status: str = "pending"
    detail: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Mode:
    """GPU (bf16) or CPU tiny (fp32) settings."""

    gpu: bool
    steps: int
    rtol: float
    model: list[str]
    train: list[str]
    moe: list[str]


def _mode(tiny: bool, steps: int | None, rtol: float | None) -> Mode:
    if tiny:
        return Mode(False, steps or 6, rtol or 1e-5, TINY_MODEL,
                    ["--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
                     "--vocab-size", "256", "--make-vocab-size-divisible-by", "128"],
                    ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size",
                     "64"])
    return Mode(True, steps or 50, rtol or 2.5e-2, GPU_MODEL,
                ["--micro-batch-size", "2", "--global-batch-size", "16", "--lr", "3e-4",
                 "--lr-warmup-iters", "5", "--vocab-size", "32000", "--bf16",
                 "--no-torch-compile-layers"],
                ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "1408",
                 "--moe-token-dispatcher-type", "alltoall",
                 # as our MoE families do: bf16 router logits flip near-tied top-k choices
                 "--moe-router-dtype", "fp32"])


def _common(mode: Mode, steps: int) -> list[str]:
    return [*mode.model, *LLAMA, "--dataset", "mock", *mode.train, "--train-iters", str(steps),
            "--log-interval", "1", "--eval-iters", "0", "--seed", "1234"]


def _run(args: list[str], nproc: int, log: Path, timeout: float,
         devices: str | None = None) -> subprocess.Popen:
    """Start ``pretrain`` under torchrun; output goes to ``log``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "megatron_patch.training.pretrain", *args]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // (2 * nproc)))
    handle = open(log, "w")  # noqa: SIM115 (closed in _finish)
    process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                               env=env, text=True)
    process.log, process.handle, process.deadline = log, handle, time.time() + timeout
    return process


def _finish(process: subprocess.Popen) -> tuple[int | None, str]:
    """Exit code (None: stopped at the time budget) and output of a run."""
    try:
        code = process.wait(timeout=max(1.0, process.deadline - time.time()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = None
    process.handle.close()
    return code, process.log.read_text()


def _tail(text: str, lines: int = 6) -> str:
    errors = [line for line in text.splitlines() if "Error" in line or "error" in line]
    return " | ".join((errors or text.splitlines())[-lines:])[-400:]


class Matrix:
    """Runs rows, keeps their results, prints the table."""

    def __init__(self, mode: Mode, out: Path, budget: float):
        self.mode, self.out, self.start, self.budget = mode, out, time.time(), budget
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.extra: list[str] = []

    def log(self, row: Row) -> Path:
        """The log file of ``row``."""
        return self.out / "logs" / (re.sub(r"[^A-Za-z0-9_.-]+", "-", row.name) + ".log")

    def time_left(self) -> float:
        """Seconds left of the budget."""
        return self.budget - (time.time() - self.start)

    def run(self, rows: list[Row], devices: list[str | None] | None = None) -> None:
        """Run ``rows`` side by side (one per device) or alone, record their losses."""
        self.rows += rows
        if self.time_left() < 30:
            for row in rows:
                row.status, row.detail = "SKIPPED", "time budget spent"
            return
        started = time.time()
        processes = [_run(row.args, row.nproc, self.log(row), self.time_left(),
                          devices[i] if devices else None)
                     for i, row in enumerate(rows)]
        for row, process in zip(rows, processes):
            code, text = _finish(process)
            row.seconds = time.time() - started
            row.losses = losses(text)
            if code is None:
                row.status, row.detail = "TIMEOUT", "stopped at the time budget (--budget)"
            elif code != 0 or not row.losses:
                row.status, row.detail = "FAILED", f"exit {code}: {_tail(text)}"

    def compare(self) -> None:
        """Status of every row against its reference row."""
        by_name = {row.name: row for row in self.rows}
        for row in self.rows:
            if row.status != "pending" or row.reference is None:
                continue
            if row.name.startswith("ref-"):
                row.status = "REF"
                continue
            ref = by_name[row.reference].losses
            expected = sorted(i for i in ref if i > row.after)
            if not expected or any(i not in row.losses for i in expected):
                row.status, row.detail = "FAILED", f"missing steps (reference {row.reference})"
                continue
            worst = max(abs(row.losses[i] - ref[i]) / abs(ref[i]) for i in expected)
            row.detail = (f"max rel diff {worst:.1e} vs {row.reference}, steps "
                          f"{expected[0]}-{expected[-1]}")
            row.status = "PASS" if worst <= self.mode.rtol else "FAIL"

    def table(self) -> str:
        """The matrix as text."""
        lines = [f"{'layout':<22} {'ranks':>5} {'steps':>5} {'first loss':>11} "
                 f"{'last loss':>11} {'time s':>7}  status  detail"]
        for row in self.rows:
            steps = sorted(row.losses)
            first = f"{row.losses[steps[0]]:.5f}" if steps else "-"
            last = f"{row.losses[steps[-1]]:.5f}" if steps else "-"
            lines.append(f"{row.name:<22} {row.nproc:>5} {len(steps):>5} {first:>11} "
                         f"{last:>11} {row.seconds:>7.0f}  {row.status:<6}  {row.detail}")
        return "\n".join([*lines, *self.extra])


def _cp_row(mode: Mode) -> Row | None:
    """CP=2 through the launcher's checks: None to run it, else a row with the refusal."""
    from megatron_patch.launch.command import compose
    from megatron_patch.launch.settings import LaunchError, RunSettings
    from megatron_patch.runtime.backends import available_backends

    backends = available_backends()
    try:
        compose("llama", "pretrain", RunSettings(cp=2, pr="bf16" if mode.gpu else "fp32",
                                                 seq_len=1024, pad_len=1024), [], backends)
    except LaunchError as refusal:
        return Row("cp2", 2, [], status="REFUSED", detail=str(refusal))
    return None


def _moe_family() -> str:
    """Mixtral when registered (llama layers with experts, as the flags here describe), else
    llama with the same experts."""
    from megatron_patch.models.registry import registered_families

    return "mixtral" if "mixtral" in registered_families() else "llama"


def _throughput(matrix: Matrix, steps: int) -> None:
    """Tokens/s of the 1.1B shape on one GPU and at DP=2 (same per-GPU batch)."""
    mode = matrix.mode
    shape = SHAPE_1B if mode.gpu else TINY_MODEL
    train = (["--vocab-size", "32000", "--bf16", "--micro-batch-size", "4"] if mode.gpu else
             ["--vocab-size", "256", "--micro-batch-size", "2"])
    rates = {}
    for nproc in (1, 2):
        per_gpu = 4 * int(train[train.index("--micro-batch-size") + 1])
        args = [*shape, *LLAMA, "--dataset", "mock", *train,
                "--global-batch-size", str(per_gpu * nproc), "--lr", "1e-4",
                "--overlap-grad-reduce", "--train-iters", str(steps),
                "--log-interval", str(max(1, steps // 6)), "--eval-iters", "0", "--seed", "1"]
        row = Row(f"{'1.1B' if mode.gpu else 'tiny'}-tokens/s-dp{nproc}", nproc, args,
                  reference=None)
        matrix.run([row])
        log = matrix.log(row)
        text = log.read_text() if log.exists() else ""
        measured = [float(v) for v in TOKENS_PER_SECOND.findall(text)][2:]  # after warm-up,
        # compilation included
        if row.status == "pending" and measured:
            rates[nproc] = statistics.median(measured)
            row.status, row.detail = "DONE", f"{rates[nproc]:,.0f} tokens/s (median)"
    if len(rates) == 2:
        speedup = rates[2] / rates[1]
        verdict = ("PASS" if speedup >= 1.9 else "BELOW GOAL") if mode.gpu else \
            "CPU ranks share the cores: not a scaling measurement"
        matrix.extra.append(f"DP=2 vs 1 GPU tokens/s: {speedup:.2f}x ({verdict}; goal >= 1.9x)")


def main(argv: list[str] | None = None) -> int:
    """Run the matrix; exit 1 if any row failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU/gloo fp32 tiny mode")
    parser.add_argument("--steps", type=int, default=None, help="steps per layout")
    parser.add_argument("--rtol", type=float, default=None, help="relative loss tolerance")
    parser.add_argument("--throughput-steps", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all rows (default 540 on GPUs, 3600 in tiny mode)")
    parser.add_argument("--out", default=os.environ.get("OUT", "output/multi_gpu"))
    args = parser.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.tiny and gpus < 2:
        print(f"{gpus} CUDA GPUs: running the CPU tiny mode (use a 2-GPU machine for bf16)")
        args.tiny = True
    mode = _mode(args.tiny, args.steps, args.rtol)
    out = Path(args.out)
    matrix = Matrix(mode, out, args.budget or (540.0 if mode.gpu else 3600.0))
    steps, half = mode.steps, mode.steps // 2
    common = _common(mode, steps)
    moe_family = _moe_family()
    moe = [*common, *mode.moe, "--model-family", moe_family]
    print(f"mode: {'GPU bf16' if mode.gpu else 'CPU fp32 tiny'}, {steps} steps, rtol "
          f"{mode.rtol:g}, MoE family {moe_family}", flush=True)

    # The two single-process references side by side, one per GPU.
    matrix.run([Row("ref-dense", 1, common), Row("ref-moe", 1, moe)],
               devices=["0", "1"] if mode.gpu else None)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        checkpoint = str(Path(scratch) / "tp2")
        layouts = [
            ("dp2", []),
            ("dp2-distopt", ["--use-distributed-optimizer"]),
            ("tp2", ["--tensor-model-parallel-size", "2", "--save", checkpoint,
                     "--save-interval", str(half)]),
            ("tp2-sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
            ("pp2", ["--pipeline-model-parallel-size", "2"]),
            ("pp2-vpp2", ["--pipeline-model-parallel-size", "2",
                          "--num-virtual-stages-per-pipeline-rank", "2"]),
        ]
        for name, extra in layouts:
            matrix.run([Row(name, 2, [*common, *extra])])
        cp = _cp_row(mode)
        if cp is not None:
            matrix.rows.append(cp)
        else:
            matrix.run([Row("cp2", 2, [*common, "--context-parallel-size", "2"])])
        matrix.run([Row("ep2", 2, [*moe, "--expert-model-parallel-size", "2"],
                        reference="ref-moe")])
        # Resume the TP=2 run's halfway checkpoint at PP=2; it must continue like TP=2.
        resume = Row("resume-tp2-to-pp2", 2, [*common, "--pipeline-model-parallel-size", "2",
                                              "--load", checkpoint, "--ckpt-step", str(half)],
                     reference="tp2", after=half)
        if any(r.name == "tp2" and r.losses for r in matrix.rows):
            matrix.run([resume])
        else:
            matrix.rows.append(resume)
            resume.status, resume.detail = "SKIPPED", "the TP=2 run failed"
    matrix.compare()
    _throughput(matrix, args.throughput_steps or (30 if mode.gpu else 12))
    print(matrix.table(), flush=True)
    summary = {"mode": "gpu-bf16" if mode.gpu else "cpu-fp32-tiny", "steps": steps,
               "rtol": mode.rtol, "rows": [{k: v for k, v in vars(r).items() if k != "args"}
                                           for r in matrix.rows], "notes": matrix.extra}
    (out / "matrix.json").write_text(json.dumps(summary, indent=1))
    failed = [r.name for r in matrix.rows if r.status in ("FAIL", "FAILED", "TIMEOUT")]
    if failed:
        print(f"failed: {failed}; logs in {out / 'logs'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
