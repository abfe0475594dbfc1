"""The ``megatron-patch`` console script: one dispatcher, each sub-command in its own module.

Sub-commands are imported lazily so ``megatron-patch --help`` stays fast and a sub-command's heavy
imports (torch, megatron) are paid only when it runs. Every target is ``main(argv) -> int | None``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("megatron_patch.training.pretrain", "pretrain a model (Megatron-LM flags)"),
    "finetune": ("megatron_patch.training.finetune",
                 "supervised fine-tuning on chat/instruction data (Megatron-LM flags)"),
    "preprocess": ("megatron_patch.data.pretrain_preprocess",
                   "JSONL/parquet/text -> Megatron .bin/.idx indexed dataset"),
    "preprocess-sft": ("megatron_patch.data.sft_preprocess",
                       "chat/instruction JSONL -> pre-tokenized SFT .bin/.idx datasets"),
    "merge-datasets": ("megatron_patch.data.merge_datasets",
                       "merge .bin/.idx shards into one dataset"),
    "convert": ("megatron_patch.conversion.cli.convert",
                "convert hf-to-mcore | mcore-to-hf checkpoints"),
    "verify": ("megatron_patch.conversion.cli.verify",
               "compare HF and Megatron logits for the same weights"),
    "export-lora": ("megatron_patch.lora.cli_export",
                    "LoRA checkpoint -> PEFT adapter directory (or --merge: merged HF model)"),
    "import-lora": ("megatron_patch.lora.cli_import",
                    "PEFT adapter directory -> LoRA checkpoint of a Megatron base"),
    "card": ("megatron_patch.conversion.cli.card",
             "verification card of a model family: logits, round trip, training vs HF"),
    "generate": ("megatron_patch.generation.cli_generate",
                 "generate completions for a file of prompts from a Megatron checkpoint"),
    "eval-ppl": ("megatron_patch.generation.cli_eval_ppl",
                 "perplexity of a Megatron checkpoint on held-out data"),
    "eval": ("megatron_patch.evaluation.cli_eval",
             "benchmark scores of a Megatron checkpoint with lm-evaluation-harness"),
    "plan": ("megatron_patch.launch.plan",
             "propose TP/PP/DP/micro-batch/recompute for N GPUs from a memory model"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: megatron-patch <command> [args]\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch <command> [args]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megatron-patch: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
