"""Megatron vs HF training of a random Llama of the TinyLlama-1.1B shape: overlaid loss curves.

    python toolkits/benchmark/training_fidelity.py [--steps 200] [--out fidelity.png]   # GPU
    python toolkits/benchmark/training_fidelity.py --small                             # CPU

Writes a random HF model (fp32; 22 layers, hidden 2048, GQA 32/4, vocab 32000; ``--small``: 2
layers, hidden 64, vocab 256), converts it to a Megatron checkpoint and runs
``megatron-patch verify --train-steps N --plot OUT`` on it: bf16 on a GPU (Megatron's bf16
weights with fp32 master copies vs HF fp32 weights under bf16 autocast), fp32 on the CPU.
Prints the per-step table and the max loss gap; exits non-zero beyond the tolerance. Without
a GPU it only runs with ``--small``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SHAPES = {
    "1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}


def write_model(path: Path, shape: str) -> Path:
    """A randomly initialised (transformers' init) fp32 Llama of ``shape``."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=2048,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shape, 20 fp32 steps")
    parser.add_argument("--steps", type=int, default=None, help="default 200 (--small: 20)")
    parser.add_argument("--seq-length", type=int, default=None, help="default 1024 (small 32)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", default="training_fidelity.png")
    parser.add_argument("--workdir", default=None, help="keep the models here")
    args = parser.parse_args(argv)
    import torch

    if not args.small and not torch.cuda.is_available():
        print("no GPU: skipping the 1.1B run (use --small on the CPU)")
        return 0
    from megatron_patch.conversion import convert_hf_to_mcore

    shape = "small" if args.small else "1.1B"
    steps = args.steps or (20 if args.small else 200)
    seq = args.seq_length or (32 if args.small else 1024)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        hf = write_model(Path(tmp) / "hf", shape)
        mcore = convert_hf_to_mcore(hf, Path(tmp) / "mcore", progress=False,
                                    make_vocab_size_divisible_by=1)
        command = [sys.executable, "-m", "megatron_patch.cli", "verify", "--hf-dir", str(hf),
                   "--mcore-dir", str(mcore), "--train-steps", str(steps),
                   "--seq-length", str(seq), "--batch-size", str(args.batch_size),
                   "--lr", str(args.lr), "--tp", str(args.tp), "--pp", str(args.pp),
                   "--plot", str(Path(args.out).resolve())]
        return subprocess.run(command, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
