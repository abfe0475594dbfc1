"""FP8 against bf16 training on the shipped corpus: the same model, data order and seed.

Tokenizes ``megatron_patch/assets/tiny_corpus.jsonl`` with the shipped tokenizer, trains a
Llama-shaped model from the same initialisation twice through the ``pretrain`` entry point
(``--bf16``, then ``--bf16 --fp8-format hybrid``: Transformer Engine when installed, torchao
float8 otherwise) and prints both loss curves, the relative gap of the mean loss over the last
``--window`` iterations, and each run's mean iteration time. Exits non-zero when the gap exceeds
``--tolerance`` (default 1%). GPU only. Run: ``python -m toolkits.benchmark.fp8_loss_parity
[--shape 3b] [--iters 300] [--seq 2048] [--mbs 2] [--output DIR] [--curves FILE.json]``.

``--rerun`` trains bf16 once more and prints that run's gap to the first by the same measure,
the spread between identical runs that the fp8 gap must be read against.

``--compare A.json B.json`` compares the bf16 curves of two such runs (e.g. with and without
Transformer Engine) step by step: the relative gap at every step after ``--after`` (default 50)
must stay within ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_patch.utils.torchrun import free_port
from toolkits.benchmark.bench_training_step import SHAPES

ASSETS = Path(__file__).resolve().parents[2] / "megatron_patch" / "assets"
LOG_LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+).*?"
    r"lm loss: ([0-9.E+-]+) \|(?:.*?grad norm: ([0-9.E+-]+))?")


def _preprocess(out: Path) -> str:
    prefix = out / "tiny_corpus"
    subprocess.run([sys.executable, "-m", "megatron_patch.cli", "preprocess", "--input",
                    str(ASSETS / "tiny_corpus.jsonl"), "--output-prefix", str(prefix),
                    "--tokenizer-type", "TinyTokenizer", "--append-eod", "--workers", "4"],
                   check=True)
    return f"{prefix}_text_document"


def _train(opts: argparse.Namespace, data: str, fp8: bool
           ) -> dict[int, tuple[float, float, float | None]]:
    """{iteration: (loss, iteration ms, grad norm)} of one run."""
    layers, hidden, ffn, heads, kv_heads, _ = SHAPES[opts.shape]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
        "--master-port", str(free_port()),
        "-m", "megatron_patch.training.pretrain",
        "--num-layers", str(layers), "--hidden-size", str(hidden), "--ffn-hidden-size", str(ffn),
        "--num-attention-heads", str(heads), "--group-query-attention", "--num-query-groups",
        str(kv_heads), "--seq-length", str(opts.seq), "--max-position-embeddings", str(opts.seq),
        "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu",
        "--position-embedding-type", "rope", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
        "--hidden-dropout", "0", "--patch-tokenizer-type", "TinyTokenizer",
        "--data-path", data, "--split", "100,0,0", "--micro-batch-size", str(opts.mbs),
        "--global-batch-size", str(opts.gbs or opts.mbs), "--lr", "3e-4", "--min-lr", "3e-5",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "30", "--train-iters",
        str(opts.iters), "--log-interval", "1", "--eval-iters", "0", "--seed", "1234",
        "--use-distributed-optimizer", "--bf16", *(["--fp8-format", "hybrid"] if fp8 else []),
        *shlex.split(opts.megatron_args),
    ]
    proc = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    found = {int(i): (float(loss), float(ms), float(norm) if norm else None)
             for i, ms, loss, norm in LOG_LINE.findall(proc.stdout)}
    if proc.returncode or not found:
        sys.exit(f"{'fp8' if fp8 else 'bf16'} run failed ({proc.returncode}):\n"
                 f"{(proc.stdout + proc.stderr)[-4000:]}")
    return found


def _curves(file: str) -> tuple[dict[int, float], dict[int, float | None]]:
    """(bf16 loss, bf16 grad norm) per iteration of a ``--curves`` file."""
    data = json.loads(Path(file).read_text())
    norms = data.get("bf16_grad_norm", {})
    return ({int(k): v for k, v in data["bf16"].items()},
            {int(k): norms.get(k) for k in data["bf16"]})


def compare(files: list[str], after: int, tolerance: float, window: int = 20) -> int:
    """Print the step-by-step gap of two runs' bf16 curves (and their gradient norms, and the
    gap of ``window``-step means); 1 when a step's gap exceeds ``tolerance``."""
    (a, norm_a), (b, norm_b) = (_curves(f) for f in files)
    steps = sorted(set(a) & set(b))
    gaps = {s: abs(a[s] - b[s]) / b[s] for s in steps}
    names = [Path(f).stem for f in files]
    print(f"{'iteration':>9}{names[0]:>12}{names[1]:>12}{'gap':>9}"
          f"{'grad norm':>11}{'grad norm':>11}")
    for step in steps:
        if step % 20 == 0 or step == steps[-1] or step in (1, 10):
            norms = "".join(f"{n[step]:>11.3f}" if n.get(step) is not None else f"{'-':>11}"
                            for n in (norm_a, norm_b))
            print(f"{step:>9}{a[step]:>12.4f}{b[step]:>12.4f}{gaps[step]:>9.2%}{norms}")
    late = [s for s in steps if s > after]
    means = {s: (statistics.mean(a[t] for t in late if s <= t < s + window),
                 statistics.mean(b[t] for t in late if s <= t < s + window))
             for s in late[::window]}
    mean_gap = max(abs(x - y) / y for x, y in means.values())
    print(f"largest gap of {window}-step means after step {after}: {mean_gap:.2%}")
    worst = max(late, key=gaps.get)
    print(f"largest gap after step {after}: {gaps[worst]:.2%} at step {worst} "
          f"(tolerance {tolerance:.0%}): {'OK' if gaps[worst] <= tolerance else 'FAILED'}")
    return int(gaps[worst] > tolerance)


def main() -> int:
    """Train bf16 and fp8, print the curves and the gap; 1 when over tolerance."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=2)
    parser.add_argument("--gbs", type=int, default=None,
                        help="global batch size (default: --mbs, one micro-batch a step)")
    parser.add_argument("--megatron-args", default="", help="further Megatron flags for every "
                        "run, e.g. '--no-torch-compile-layers'")
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--output", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--curves", default=None, help="write both loss curves to this JSON")
    parser.add_argument("--no-fp8", dest="fp8", action="store_false",
                        help="train the bf16 curve only (for --compare)")
    parser.add_argument("--rerun", action="store_true",
                        help="train bf16 a second time and print its gap to the first by the "
                             "same measure: the run-to-run spread the fp8 gap is read against")
    parser.add_argument("--compare", nargs=2, metavar="JSON",
                        help="compare the bf16 curves of two --curves files instead")
    parser.add_argument("--after", type=int, default=50, help="--compare: first step checked")
    opts = parser.parse_args()
    if opts.compare:
        return compare(opts.compare, opts.after, opts.tolerance, opts.window)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(opts.output or tmp)
        out.mkdir(parents=True, exist_ok=True)
        data = _preprocess(out)
        bf16 = _train(opts, data, fp8=False)
        fp8 = _train(opts, data, fp8=True) if opts.fp8 else {}
        rerun = _train(opts, data, fp8=False) if opts.rerun else {}
    if opts.curves:
        Path(opts.curves).write_text(json.dumps(
            {**{name: {step: point[0] for step, point in curve.items()}
                for name, curve in (("bf16", bf16), ("fp8", fp8), ("bf16_rerun", rerun))},
             "bf16_grad_norm": {step: point[2] for step, point in bf16.items()}}))
    if not opts.fp8:
        print(f"bf16 loss: step 1 {bf16[min(bf16)][0]:.4f}, step {max(bf16)} "
              f"{bf16[max(bf16)][0]:.4f}")
        return 0
    print(f"{'iteration':>9}{'bf16 loss':>11}{'fp8 loss':>10}")
    for step in sorted(bf16):
        if step % max(1, opts.iters // 15) == 0 or step == max(bf16):
            print(f"{step:>9}{bf16[step][0]:>11.4f}{fp8.get(step, (float('nan'),))[0]:>10.4f}")
    last = sorted(bf16)[-opts.window:]
    mean_bf16 = statistics.mean(bf16[s][0] for s in last)
    mean_fp8 = statistics.mean(fp8[s][0] for s in last)
    gap = abs(mean_fp8 - mean_bf16) / mean_bf16
    timed = sorted(bf16)[len(bf16) // 3:]  # past compilation and warm-up
    ms_bf16 = statistics.median(bf16[s][1] for s in timed)
    ms_fp8 = statistics.median(fp8[s][1] for s in timed)
    print(f"mean loss over the last {len(last)} iterations: bf16 {mean_bf16:.4f}, fp8 "
          f"{mean_fp8:.4f}, gap {gap:.2%} (tolerance {opts.tolerance:.0%})")
    if rerun:
        mean_rerun = statistics.mean(rerun[s][0] for s in last)
        print(f"bf16 rerun: {mean_rerun:.4f}, gap to the first bf16 run "
              f"{abs(mean_rerun - mean_bf16) / mean_bf16:.2%} (the run-to-run spread)")
    print(f"median iteration: bf16 {ms_bf16:.1f} ms, fp8 {ms_fp8:.1f} ms "
          f"({ms_bf16 / ms_fp8:.2f}x)")
    return int(gap > opts.tolerance)


if __name__ == "__main__":
    sys.exit(main())
