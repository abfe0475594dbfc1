"""``python -m rlhf.launch FAMILY STAGE [flags]``: the torchrun command of an RLHF stage.

STAGE is ``rm`` (reward model), ``dpo``, ``grpo`` or ``ppo``. Settings come from the
environment, with tiny CPU-friendly defaults: without ``LOAD`` a random ``MODEL_SIZE=tiny``
model of the family with the shipped tokenizer, on the shipped data
(``megatron_patch/assets/tiny_preferences.jsonl``, ``tiny_sum_prompts.jsonl``), on this node's
GPUs or on the CPU.

  LOAD            SFT/converted checkpoint to start from (--finetune), default none
  REF_LOAD        frozen reference (dpo, grpo, ppo), default LOAD
  MODEL_SIZE      without LOAD: a size of the family (megatron_patch/models/<family>/sizes.py)
  TOKENIZER_TYPE  default: HFTokenizer when LOAD holds tokenizer files, TinyTokenizer for tiny
  TOKENIZER_PATH  default: LOAD
  TP PP NPROC     layout; NPROC defaults to the GPU count (TP*PP on the CPU)
  MBS GBS LR ITERS SEQ_LEN DATA  batch rows, learning rate, iterations, data
  SAVE            checkpoint directory (default output/rlhf/STAGE-FAMILY; none: no checkpoint)
  PR              auto (bf16 on GPUs, fp32 on the CPU), bf16, fp16, fp32
  DRY_RUN=1       print the command instead of running it

Trailing flags go to the entry point (``rlhf.reward_model``, ``rlhf.dpo``, ``rlhf.grpo``,
``rlhf.ppo``: e.g. ``--reward-model``/``--critic-load``) and
from there to Megatron, and win over the defaults.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "megatron_patch" / "assets"
MODULES = {"rm": "rlhf.reward_model", "dpo": "rlhf.dpo", "grpo": "rlhf.grpo", "ppo": "rlhf.ppo"}
# stage -> (data, MBS, GBS, LR, ITERS, SEQ_LEN, stage flags)
STAGES = {
    "rm": ("tiny_preferences.jsonl", 8, 16, "1e-3", 30, 128, []),
    "dpo": ("tiny_preferences.jsonl", 8, 16, "5e-4", 30, 128, ["--dpo-beta", "0.1"]),
    "grpo": ("tiny_sum_prompts.jsonl", 32, 64, "3e-3", 30, 32, [
        "--reward-fn", "rlhf.rewards:leading_number", "--max-new-tokens", "4",
        "--grpo-group-size", "8", "--grpo-kl-beta", "0.01", "--grpo-iterations", "1",
        "--grpo-clamp-eps-lower", "0.2", "--grpo-clamp-eps-upper", "0.2"]),
    "ppo": ("tiny_sum_prompts.jsonl", 32, 64, "3e-3", 30, 32, [
        "--reward-fn", "rlhf.rewards:leading_number", "--max-new-tokens", "4",
        "--grpo-group-size", "1", "--ppo-kl-coef", "0.01", "--grpo-iterations", "2",
        "--grpo-clamp-eps-lower", "0.2", "--grpo-clamp-eps-upper", "0.2"]),
}


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _model_flags(family: str, load: str | None) -> list[str]:
    """Architecture and tokenizer flags: the checkpoint's, or a table size's."""
    tokenizer_type = os.environ.get("TOKENIZER_TYPE")
    tokenizer_path = os.environ.get("TOKENIZER_PATH", load)
    if load:
        flags = ["--load", load, "--finetune", "--no-load-optim", "--no-load-rng"]
        has_files = any((Path(load) / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                             "tokenizer_config.json"))
        tokenizer_type = tokenizer_type or ("HFTokenizer" if has_files else None)
        if tokenizer_type is None:
            raise SystemExit(f"LOAD={load} holds no tokenizer files: set TOKENIZER_TYPE "
                             "(and TOKENIZER_PATH)")
    else:
        from megatron_patch.launch.flags import megatron_flags
        from megatron_patch.launch.model_sizes import model_size_config
        from megatron_patch.models.registry import get_family

        size = _env("MODEL_SIZE", "tiny")
        flags = megatron_flags(get_family(family).hf_to_megatron(model_size_config(family, size)))
        tokenizer_type = tokenizer_type or "TinyTokenizer"
        tokenizer_path = os.environ.get("TOKENIZER_PATH")
    flags += ["--patch-tokenizer-type", tokenizer_type]
    return flags + (["--patch-tokenizer-path", tokenizer_path] if tokenizer_path else [])


def _save_flags(stage: str, family: str) -> list[str]:
    save = _env("SAVE", f"output/rlhf/{stage}-{family}")
    return [] if save == "none" else ["--save", save, "--save-interval", "1000"]


def compose(family: str, stage: str, extra: Sequence[str]) -> list[str]:
    """The torchrun command line of ``stage`` for ``family``."""
    import torch

    if stage not in MODULES:
        raise SystemExit(f"stage {stage!r}: use one of {', '.join(MODULES)}")
    data, mbs, gbs, lr, iters, seq, stage_flags = STAGES[stage]
    tp, pp = int(_env("TP", "1")), int(_env("PP", "1"))
    gpus = torch.cuda.device_count()
    nproc = int(_env("NPROC", str(gpus or tp * pp)))
    pr = _env("PR", "auto")
    pr = ("bf16" if gpus else "fp32") if pr == "auto" else pr
    load = os.environ.get("LOAD")
    seq_len = _env("SEQ_LEN", str(seq))  # at most the model's max_position_embeddings
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", _env("MASTER_PORT", "29500"), "-m", MODULES[stage],
        *_model_flags(family, load),
        "--model-family", family, "--train-data", _env("DATA", str(ASSETS / data)),
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--micro-batch-size", _env("MBS", str(mbs)), "--global-batch-size", _env("GBS", str(gbs)),
        "--lr", _env("LR", lr), "--min-lr", "0", "--lr-decay-style", "cosine",
        "--train-iters", _env("ITERS", str(iters)), "--seq-length", seq_len,
        "--attention-dropout", "0", "--hidden-dropout", "0", "--weight-decay", "0",
        "--clip-grad", "1.0", "--log-interval", "5",
        "--num-workers", "0", *_save_flags(stage, family),
        *{"bf16": ["--bf16"], "fp16": ["--fp16"]}.get(pr, []), *stage_flags, *extra]
    if load and os.environ.get("REF_LOAD") and stage != "rm":
        command += ["--ref-load", os.environ["REF_LOAD"]]
    return command


def main(argv: Sequence[str] | None = None) -> int:
    """Compose and run (or print) the command; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    command = compose(argv[0], argv[1], argv[2:])
    if os.environ.get("DRY_RUN") == "1":
        print(shlex.join(command))
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    raise SystemExit(main())
