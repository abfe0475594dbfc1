"""``megatron-patch preprocess``: JSONL / parquet / text -> Megatron ``.bin``/``.idx`` datasets.

Flags and outputs follow Megatron-LM's ``tools/preprocess_data.py``: one dataset per
``--json-keys`` key at ``{output_prefix}_{key}_document`` (``_sentence`` with
``--split-sentences``), token dtype ``DType.optimal_dtype(vocab_size)``, documents in input order,
EOD appended to each non-empty document with ``--append-eod``. For the same tokenizer and input
the files are byte-identical to Megatron-LM's. Differences: malformed lines are reported with
their line numbers (``--on-error``), blank lines are ignored, sentences are split by a lossless
regex (no NLTK), and files appear atomically only once complete.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron.core.datasets.indexed_dataset import DType

from megatron_patch.data.bad_records import DataError
from megatron_patch.data.encoder import Encoder
from megatron_patch.data.preprocess_core import Output, add_common_arguments, encode_to_datasets
from megatron_patch.data.readers import INPUT_SUFFIXES, input_files, read_records
from megatron_patch.tokenizer import Tokenizer, build_tokenizer


def output_prefixes(output_prefix: str | Path, json_keys: Sequence[str],
                    split_sentences: bool = False) -> dict[str, Path]:
    """Megatron's dataset prefix for each key: ``{output_prefix}_{key}_{document|sentence}``."""
    level = "sentence" if split_sentences else "document"
    return {key: Path(f"{output_prefix}_{key}_{level}") for key in json_keys}


def preprocess_file(input: str | Path, output_prefix: str | Path, tokenizer: Tokenizer,
                    json_keys: Sequence[str] = ("text",), *, workers: int = 1,
                    append_eod: bool = False, split_sentences: bool = False,
                    on_error: str = "fail", chunk_size: int = 64,
                    progress: bool = True) -> dict[str, Path]:
    """Tokenize ``input`` into one indexed dataset per key; returns ``{key: dataset prefix}``.

    ``input`` is a JSONL file, a parquet file, or a directory of ``.jsonl``/``.json``/``.txt``/
    ``.parquet`` files (a ``.txt`` file is one document under key ``text``). Malformed records
    raise :class:`DataError` (``on_error="fail"``) or are skipped and reported ("skip").
    """
    keys = tuple(json_keys)
    files = input_files(input)
    prefixes = output_prefixes(output_prefix, keys, split_sentences)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    encode_to_datasets(input, read_records(files, list(keys)),
                       Encoder(tokenizer, keys, split_sentences, append_eod),
                       {key: Output(prefix, dtype) for key, prefix in prefixes.items()},
                       name="preprocess", counted=keys, workers=workers, on_error=on_error,
                       chunk_size=chunk_size, progress=progress)
    return prefixes


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM ``tools/preprocess_data.py`` flags (the ones that apply here)."""
    parser = argparse.ArgumentParser(prog="megatron-patch preprocess",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    add_common_arguments(parser, INPUT_SUFFIXES)
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON keys to tokenize, one dataset each "
                             "(outputs {prefix}_{key}_document.*)")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the end-of-document token to each document")
    parser.add_argument("--split-sentences", action="store_true",
                        help="one sequence per sentence (outputs *_sentence.bin/.idx)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``megatron-patch preprocess``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_path)
        preprocess_file(args.input, args.output_prefix, tokenizer, args.json_keys,
                        workers=args.workers, append_eod=args.append_eod,
                        split_sentences=args.split_sentences, on_error=args.on_error,
                        chunk_size=max(1, args.chunk_size))
    except (DataError, ValueError, OSError, ImportError) as error:
        print(f"preprocess: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
