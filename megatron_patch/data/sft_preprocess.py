"""``megatron-patch preprocess-sft``: chat/instruction data -> pre-tokenized SFT datasets.

Renders and tokenizes every sample once (``--workers`` processes) into two Megatron indexed
datasets with one document per sample: ``{output_prefix}_input_ids_document.bin/.idx`` (token
ids, ``DType.optimal_dtype(vocab_size)``: uint16 below 65,500 tokens, else int32) and
``{output_prefix}_loss_mask_document.bin/.idx`` (uint8, 1 on assistant tokens). Train on them
with ``finetune --data-path {output_prefix}``; sequence length, padding or packing and
``--sft-train-on-prompt`` are chosen at training time. Input formats: see
:mod:`megatron_patch.data.sft_format`. Malformed samples are reported with their line numbers
(``--on-error``); files appear atomically only once complete.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy
from megatron.core.datasets.indexed_dataset import DType

from megatron_patch.data.bad_records import DataError
from megatron_patch.data.preprocess_core import Output, add_common_arguments, encode_to_datasets
from megatron_patch.data.readers import input_files, read_records
from megatron_patch.data.sft_encoder import SFTEncoder
from megatron_patch.data.sft_format import SFT_KEYS
from megatron_patch.data.sft_sources import RAW_SUFFIXES, pretokenized_prefixes
from megatron_patch.tokenizer import Tokenizer, build_tokenizer


def preprocess_sft(input: str | Path, output_prefix: str | Path, tokenizer: Tokenizer, *,
                   workers: int = 1, on_error: str = "fail", chunk_size: int = 64,
                   progress: bool = True) -> dict[str, Path]:
    """Tokenize the SFT samples of ``input``; returns ``{"input_ids"|"loss_mask": prefix}``."""
    prefixes = pretokenized_prefixes(output_prefix)
    dtypes = {"input_ids": DType.optimal_dtype(tokenizer.vocab_size), "loss_mask": numpy.uint8}
    encode_to_datasets(input, read_records(input_files(input), list(SFT_KEYS)),
                       SFTEncoder(tokenizer),
                       {key: Output(prefix, dtypes[key]) for key, prefix in prefixes.items()},
                       name="preprocess-sft", counted=("input_ids",), workers=workers,
                       on_error=on_error, chunk_size=chunk_size, progress=progress)
    return prefixes


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch preprocess-sft``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="megatron-patch preprocess-sft",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    args = add_common_arguments(parser, RAW_SUFFIXES).parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_path)
        preprocess_sft(args.input, args.output_prefix, tokenizer, workers=args.workers,
                       on_error=args.on_error, chunk_size=max(1, args.chunk_size))
    except (DataError, ValueError, OSError, ImportError) as error:
        print(f"preprocess-sft: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
