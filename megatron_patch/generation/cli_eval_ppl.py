"""``megatron-patch eval-ppl``: perplexity of a Megatron checkpoint on held-out data.

    megatron-patch eval-ppl --load M --data-path PREFIX_OR_FILES [--tp N] [--pp N]
        [--seq-length 1024] [--batch-size 4] [--json-key text] [--append-eod]
        [--on-error skip|fail] [--output result.json] [--dtype auto|fp32|bf16|fp16]
        [--tokenizer-type T] [--tokenizer-path P] [Megatron flags ...]

``--data-path`` is a Megatron indexed dataset prefix (``PREFIX.bin``/``.idx``) or a JSONL,
parquet or text file (or a directory of them), tokenized as ``megatron-patch preprocess``
does. Prints the perplexity; ``--output`` also writes it as JSON (atomically). With
``tp * pp > 1`` it relaunches itself under torchrun with that many processes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from megatron_patch.data.bad_records import ON_ERROR
from megatron_patch.generation.model import add_model_options, is_rank0, run_cli

MODULE = "megatron_patch.generation.cli_eval_ppl"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-patch eval-ppl",
                                     description="Perplexity of a Megatron checkpoint on "
                                                 "held-out documents.")
    add_model_options(parser)
    parser.add_argument("--data-path", required=True,
                        help="indexed dataset prefix, or JSONL/parquet/text file or directory")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens of context per window (default: min(1024, "
                             "max_position_embeddings))")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--json-key", default="text", help="text key of JSONL/parquet records")
    parser.add_argument("--append-eod", action="store_true",
                        help="end raw documents with the EOD token (as preprocess does)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="a malformed record is skipped (and listed) or stops the run")
    parser.add_argument("--output", default=None, help="also write the result to this JSON file")
    return parser


def run(options: argparse.Namespace, extra: Sequence[str]) -> int:
    """Evaluate on this rank (inside an initialised world of ``tp * pp`` ranks)."""
    import torch

    from megatron_patch.generation.model import (
        args_from_options,
        load_inference_model,
        load_tokenizer,
    )
    from megatron_patch.generation.perplexity import (
        load_documents,
        negative_log_likelihood,
        windows,
    )
    from megatron_patch.utils.files import atomic_write_text

    args = args_from_options(options, extra, seq_length=options.seq_length,
                             micro_batch_size=options.batch_size)
    if options.seq_length is None:
        args.seq_length = min(1024, args.max_position_embeddings)
    tokenizer = load_tokenizer(args)
    documents = load_documents(options.data_path, tokenizer, json_key=options.json_key,
                               append_eod=options.append_eod, on_error=options.on_error,
                               report=None if is_rank0() else (lambda _line: None))
    loaded = load_inference_model(args, tokenizer)
    nll, tokens = negative_log_likelihood(loaded.model, windows(documents, args.seq_length),
                                          vocab_rows=loaded.vocab_rows,
                                          batch_size=options.batch_size)
    result = {"perplexity": math.exp(nll / tokens), "mean_nll": nll / tokens, "tokens": tokens,
              "documents": len(documents), "seq_length": args.seq_length,
              "load": str(options.load), "data_path": str(options.data_path)}
    if is_rank0():
        print(f"perplexity {result['perplexity']:.4f} (mean NLL {result['mean_nll']:.5f} over "
              f"{tokens} tokens of {len(documents)} documents, windows of {args.seq_length})",
              flush=True)
        if options.output:
            atomic_write_text(options.output, json.dumps(result, indent=2) + "\n")
    torch.distributed.barrier()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch eval-ppl ...``; returns the exit status."""
    return run_cli("megatron-patch eval-ppl", MODULE, _parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
