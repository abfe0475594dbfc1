"""``megatron-patch generate``: batch text generation from a Megatron checkpoint.

    megatron-patch generate --load M --input prompts.jsonl --output out.jsonl [--tp N] [--pp N]
        [--batch-size 8] [--max-new-tokens 128] [--max-seq-length N]
        [--max-prompt-tokens N] [--greedy]
        [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R] [--seed S]
        [--chat] [--stop STR ...] [--ignore-eos] [--token-ids] [--on-error skip|fail]
        [--dtype auto|fp32|bf16|fp16] [--tokenizer-type T] [--tokenizer-path P]
        [--no-cuda-graphs] [--no-progress] [Megatron flags ...]

Input and output formats: :mod:`megatron_patch.generation.prompts`. With ``tp * pp > 1`` it
relaunches itself under torchrun with that many processes (gloo on the CPU, nccl on GPUs).
Unknown flags are passed to Megatron's argument parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_patch.data.bad_records import ON_ERROR, DataError
from megatron_patch.generation.model import add_model_options, is_rank0, run_cli

MODULE = "megatron_patch.generation.cli_generate"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-patch generate",
                                     description="Generate completions for the prompts of a "
                                                 "file with a Megatron checkpoint.")
    add_model_options(parser)
    parser.add_argument("--input", required=True,
                        help="prompts, one per line: text, {\"prompt\": ...} or "
                             "{\"messages\": [...]}")
    parser.add_argument("--output", required=True, help="JSONL file of completions")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts run together")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="prompt + completion tokens (default: max_position_embeddings)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longer prompts are malformed (default: --max-seq-length - 1)")
    parser.add_argument("--greedy", action="store_true", help="arg-max decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 means --greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0: off")
    parser.add_argument("--seed", type=int, default=1234,
                        help="sampling seed (prompt i samples with seed + i)")
    parser.add_argument("--chat", action="store_true",
                        help="render text prompts as a user turn with the chat template")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop when the completion contains STR (repeatable; not output)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="do not stop at end-of-sequence tokens")
    parser.add_argument("--token-ids", action="store_true",
                        help="also write prompt_ids and completion_ids")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="a malformed input line is skipped (and listed) or stops the run")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="decode eagerly on GPUs (CUDA graphs are used where possible)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def _record(prompt, completion, token_ids: bool) -> dict:
    record = {"line": prompt.line}
    if prompt.id is not None:
        record["id"] = prompt.id
    record.update(prompt=prompt.source, completion=completion.text,
                  prompt_tokens=len(prompt.tokens), completion_tokens=len(completion.tokens),
                  finish_reason=completion.finish_reason)
    if token_ids:
        record.update(prompt_ids=prompt.tokens, completion_ids=completion.tokens)
    return record


def run(options: argparse.Namespace, extra: Sequence[str]) -> int:
    """Generate on this rank (inside an initialised world of ``tp * pp`` ranks)."""
    import torch
    from tqdm import tqdm

    from megatron_patch.generation.engine import Generator, Throughput, generate
    from megatron_patch.generation.model import (
        args_from_options,
        load_inference_model,
        load_tokenizer,
    )
    from megatron_patch.generation.prompts import read_prompts, write_jsonl
    from megatron_patch.generation.sampling import SamplingParams
    from megatron_patch.generation.stopping import StopChecker

    params = SamplingParams(greedy=options.greedy, temperature=options.temperature,
                            top_k=options.top_k, top_p=options.top_p,
                            repetition_penalty=options.repetition_penalty, seed=options.seed)
    if options.batch_size < 1 or options.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1")
    args = args_from_options(options, extra, seq_length=options.max_seq_length,
                             micro_batch_size=options.batch_size)
    tokenizer = load_tokenizer(args)
    max_prompt = min(args.seq_length - 1, options.max_prompt_tokens or args.seq_length)
    prompts = read_prompts(options.input, tokenizer, chat=options.chat,
                           max_prompt_tokens=max_prompt, on_error=options.on_error,
                           report=None if is_rank0() else (lambda _line: None))
    if not prompts:
        raise DataError(f"--input {options.input}: no prompts")
    loaded = load_inference_model(args, tokenizer)
    stop = StopChecker(tokenizer, () if options.ignore_eos else loaded.eos_ids(), options.stop)
    generator = Generator(loaded.model, vocab_rows=loaded.vocab_rows, pad_id=tokenizer.pad,
                          cuda_graphs=options.cuda_graphs)
    bar = tqdm(total=len(prompts), unit="prompt", desc="generate",
               disable=not (options.progress and is_rank0()))
    speed = Throughput()

    def progress(done: int, tokens: int) -> None:
        bar.set_postfix_str(f"{speed.add(tokens):.1f} tokens/s", refresh=False)
        bar.update(done)

    completions = generate(generator, [p.tokens for p in prompts],
                           max_new_tokens=options.max_new_tokens, params=params, stop=stop,
                           batch_size=options.batch_size, max_seq_length=args.seq_length,
                           progress=progress)
    bar.close()
    if is_rank0():
        write_jsonl(options.output, [_record(p, c, options.token_ids)
                                     for p, c in zip(prompts, completions)])
        print(f"wrote {len(completions)} completions to {options.output} ({speed.tokens} tokens, "
              f"{speed.add(0):.1f} tokens/s)", flush=True)
    torch.distributed.barrier()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch generate ...``; returns the exit status."""
    return run_cli("megatron-patch generate", MODULE, _parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
