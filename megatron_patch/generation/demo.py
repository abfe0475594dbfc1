"""The no-argument generation demo: a small checkpoint and prompts from shipped assets.

``python -m megatron_patch.generation.demo [OUT]`` generates completions into ``OUT`` (default
``output/generation_demo``) with the newest checkpoint of the tiny pretraining demo
(``examples/llama/run_pretrain_mcore_llama.sh`` with no arguments) if there is one, else with a
tiny randomly initialised Llama converted from Hugging Face format (its text is noise).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

PRETRAIN_DEMO = "output/checkpoint/pretrain-mcore-llama-tiny-*/latest_checkpointed_iteration.txt"
PROMPTS = [
    "The Python standard library",
    {"prompt": "To open a file in Python,", "id": "files"},
    {"messages": [{"role": "user", "content": "What does the json module do?"}]},
]


def trained_checkpoint() -> Path | None:
    """The newest checkpoint of the tiny pretraining demo, if it was run here."""
    trackers = sorted(Path().glob(PRETRAIN_DEMO), key=lambda p: p.stat().st_mtime)
    return trackers[-1].parent if trackers else None


def random_checkpoint(out: Path) -> Path:
    """A tiny random Llama (the pretraining demo's shape) with the shipped tokenizer,
    converted to a Megatron checkpoint under ``out`` (built once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_patch.conversion import convert_hf_to_mcore
    from megatron_patch.tokenizer import TINY_TOKENIZER_DIR

    mcore = out / "tiny-llama-random-mcore"
    if (mcore / "latest_checkpointed_iteration.txt").is_file():
        return mcore
    hf = out / "tiny-llama-random-hf"
    shutil.rmtree(hf, ignore_errors=True)
    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf)
    for file in TINY_TOKENIZER_DIR.iterdir():
        shutil.copy2(file, hf / file.name)
    return convert_hf_to_mcore(hf, mcore, progress=False)


def main(argv: list[str] | None = None) -> int:
    """Prepare the checkpoint and prompts, then run ``megatron-patch generate`` on them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(argv[0] if argv else "output/generation_demo")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = trained_checkpoint()
    if checkpoint is None:
        print("no checkpoint of the tiny pretraining demo under output/checkpoint: using a "
              "random tiny Llama (run examples/llama/run_pretrain_mcore_llama.sh first for "
              "text that resembles the shipped corpus)", flush=True)
        checkpoint = random_checkpoint(out)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join((p if isinstance(p, str) else json.dumps(p)) + "\n"
                               for p in PROMPTS))
    from megatron_patch.generation.cli_generate import main as generate

    output = out / "completions.jsonl"
    status = generate(["--load", str(checkpoint), "--input", str(prompts), "--output",
                       str(output), "--max-new-tokens", "48", "--temperature", "0.7",
                       "--top-p", "0.9", "--repetition-penalty", "1.2", "--stop", "\n\n"])
    if status == 0:
        for line in output.read_text().splitlines():
            record = json.loads(line)
            print(f"\n[{record['line']}] {record['prompt']!r}\n -> {record['completion']!r}")
    return status


if __name__ == "__main__":
    sys.exit(main())
