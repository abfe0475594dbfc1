"""One GRPO run on a small model; reports rollout (generation) and training tokens/s.

The model is a random Qwen2.5-0.5B shape (``qwen2`` family, 0.49B parameters, from the launch
table) in bf16, prompts are the shipped ``"a+b="`` set (byte tokenizer, so the rollouts sample
among 257 tokens but the output layer computes all 151,936 rows), 32 prompts x 8 completions
of up to ``--max-new-tokens`` per iteration, rollouts through the generation engine on the
policy's own weights, then one Adam step on the 256 sequences. It prints the entry point's
throughput summary and one JSON line: rollout tokens/s (generated tokens over sampling time),
training tokens/s (prompt + completion tokens over forward, backward and optimizer time, last
iteration excluded), and the mean reward.

GPU (< 3 minutes on one H100):  ``python -m toolkits.benchmark.bench_grpo``
CPU:  ``python -m toolkits.benchmark.bench_grpo --tiny`` (the tiny Llama, fp32, few tokens).
Without CUDA and without ``--tiny`` it says so and exits 0. Extra flags after ``--`` go to
``rlhf.grpo``/Megatron.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from megatron_patch.utils.torchrun import free_port

REPO = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"GRPO throughput: rollout ([0-9.]+) tokens/s \((\d+) generated tokens\), "
                     r"training ([0-9.]+) tokens/s \((\d+) trained tokens\)")
REWARD = re.compile(r"iteration\s+\d+/.*? reward: ([0-9.E+-]+) \|")


def command(tiny: bool, iters: int, max_new_tokens: int, nproc: int, extra: list[str]
            ) -> tuple[list[str], dict[str, str]]:
    """The ``rlhf.launch`` command and environment of the benchmark run."""
    family, size = ("llama", "tiny") if tiny else ("qwen2", "0.5B")
    env = {"MODEL_SIZE": size, "TOKENIZER_TYPE": "ByteTokenizer", "NPROC": str(nproc),
           "ITERS": str(iters), "GBS": "64" if tiny else "256", "MBS": "32" if tiny else "16",
           "SEQ_LEN": str(16 + max_new_tokens), "LR": "1e-6", "MASTER_PORT": str(free_port()),
           "SAVE": "none"}
    flags = ["--max-new-tokens", str(max_new_tokens), "--reward-fn",
             "rlhf.rewards:leading_number", "--log-interval", "1",
             *(["--no-torch-compile-layers"] if not tiny else []), *extra]
    return [sys.executable, "-m", "rlhf.launch", family, "grpo", *flags], env


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--iters", type=int, default=None, help="GRPO iterations")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--nproc", type=int, default=1, help="processes (data parallel)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    options = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not options.tiny and not torch.cuda.is_available():
        print("bench_grpo: no CUDA device; run with --tiny for the CPU check")
        return 0
    iters = options.iters or (4 if options.tiny else 6)
    new_tokens = options.max_new_tokens or (4 if options.tiny else 256)
    cmd, env = command(options.tiny, iters, new_tokens, options.nproc, extra)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": os.pathsep.join(
                                     filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                                 **env})
    found = list(SUMMARY.finditer(result.stdout))
    if result.returncode or not found:
        print(result.stdout[-3000:] + result.stderr[-3000:], file=sys.stderr)
        return result.returncode or 1
    rollout, generated, training, trained = found[-1].groups()
    print(found[-1].group(0))
    rewards = [float(r) for r in REWARD.findall(result.stdout)]
    print(json.dumps({"model": "llama-tiny" if options.tiny else "qwen2.5-0.5B-shape (random)",
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                      else "cpu", "iterations": iters, "max_new_tokens": new_tokens,
                      "rollout_tokens_per_s": float(rollout), "generated_tokens": int(generated),
                      "training_tokens_per_s": float(training), "trained_tokens": int(trained),
                      "mean_reward": rewards}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
