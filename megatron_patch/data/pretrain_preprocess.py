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
import itertools
import multiprocessing
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

from megatron.core.datasets.indexed_dataset import DType
from tqdm import tqdm

from megatron_patch.data.encoder import Encoded, Encoder
from megatron_patch.data.indexed_io import atomic_builder
from megatron_patch.data.readers import input_files, read_records
from megatron_patch.tokenizer import TOKENIZERS, Tokenizer, build_tokenizer

MAX_REPORTED = 20  # malformed records listed one by one; the rest are only counted


class PreprocessError(RuntimeError):
    """Preprocessing stopped on a malformed record (``--on-error fail``)."""


def output_prefixes(output_prefix: str | Path, json_keys: Sequence[str],
                    split_sentences: bool = False) -> dict[str, Path]:
    """Megatron's dataset prefix for each key: ``{output_prefix}_{key}_{document|sentence}``."""
    level = "sentence" if split_sentences else "document"
    return {key: Path(f"{output_prefix}_{key}_{level}") for key in json_keys}


def _chunks(records: Iterable, size: int) -> Iterator[list]:
    iterator = iter(records)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


_WORKER_ENCODER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(chunk: list) -> list:
    return _WORKER_ENCODER.encode_chunk(chunk)


def _encoded_chunks(encoder: Encoder, chunks: Iterator[list], workers: int,
                    stack: ExitStack) -> Iterator[list]:
    """Encoded chunks in input order: in this process, or by a pool of ``workers``."""
    if workers <= 1:
        return map(encoder.encode_chunk, chunks)
    pool = stack.enter_context(multiprocessing.Pool(workers, _init_worker, (encoder,)))
    return pool.imap(_encode_in_worker, chunks)


def preprocess_file(input: str | Path, output_prefix: str | Path, tokenizer: Tokenizer,
                    json_keys: Sequence[str] = ("text",), *, workers: int = 1,
                    append_eod: bool = False, split_sentences: bool = False,
                    on_error: str = "fail", chunk_size: int = 64,
                    progress: bool = True) -> dict[str, Path]:
    """Tokenize ``input`` into one indexed dataset per key; returns ``{key: dataset prefix}``.

    ``input`` is a JSONL file, a parquet file, or a directory of ``.jsonl``/``.json``/``.txt``/
    ``.parquet`` files (a ``.txt`` file is one document under key ``text``). Malformed records
    raise :class:`PreprocessError` (``on_error="fail"``) or are skipped and reported ("skip").
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    keys = tuple(json_keys)
    files = input_files(input)
    prefixes = output_prefixes(output_prefix, keys, split_sentences)
    encoder = Encoder(tokenizer, keys, split_sentences, append_eod)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    documents = tokens = skipped = 0
    start = time.perf_counter()
    with ExitStack() as stack:
        builders = {key: stack.enter_context(atomic_builder(prefix, dtype))
                    for key, prefix in prefixes.items()}
        bar = stack.enter_context(tqdm(desc="preprocess", unit=" docs", disable=not progress,
                                       mininterval=1.0, file=sys.stderr))
        chunks = _chunks(read_records(files, list(keys)), chunk_size)
        for results in _encoded_chunks(encoder, chunks, workers, stack):
            for location, result in results:
                if isinstance(result, str):
                    if on_error == "fail":
                        raise PreprocessError(f"{location}: {result}")
                    if skipped < MAX_REPORTED:
                        bar.write(f"preprocess: skipped {location}: {result}", file=sys.stderr)
                    skipped += 1
                elif result is not None:
                    tokens += _add(builders, result)
                    documents += 1
            bar.update(len(results))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tokens/s",
                                refresh=False)
        if documents == 0:
            detail = f" ({skipped} malformed records skipped)" if skipped else ""
            raise PreprocessError(f"{input}: no documents to write{detail}")
    seconds = time.perf_counter() - start
    names = ", ".join(f"{prefix}.bin/.idx" for prefix in prefixes.values())
    dropped = f", {skipped} malformed skipped" if skipped else ""
    print(f"preprocess: {documents} documents{dropped}, {tokens} tokens in {seconds:.1f}s "
          f"({documents / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tokens/s) -> {names}")
    if skipped > MAX_REPORTED:
        print(f"preprocess: {skipped - MAX_REPORTED} more malformed records skipped; "
              f"first {MAX_REPORTED} listed above", file=sys.stderr)
    return prefixes


def _add(builders: dict, encoded: Encoded) -> int:
    """Append one record's documents to the builders; returns its token count."""
    count = 0
    for key, (ids, lengths) in encoded.items():
        builders[key].add_document(ids, lengths)
        count += len(ids)
    return count


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM ``tools/preprocess_data.py`` flags (the ones that apply here)."""
    parser = argparse.ArgumentParser(prog="megatron-patch preprocess",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--input", required=True,
                        help="JSONL file, parquet file, or directory of .jsonl/.txt files")
    parser.add_argument("--output-prefix", required=True,
                        help="output path without suffix; files are {prefix}_{key}_document.*")
    parser.add_argument("--tokenizer-type", required=True, choices=list(TOKENIZERS))
    parser.add_argument("--tokenizer-model", "--tokenizer-path", dest="tokenizer_path",
                        default=None, help="tokenizer directory or file (not for Byte/Tiny)")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON keys to tokenize, one dataset each")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the end-of-document token to each document")
    parser.add_argument("--split-sentences", action="store_true",
                        help="one sequence per sentence (outputs *_sentence.bin/.idx)")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="fail",
                        help="malformed line (bad JSON/UTF-8, missing key): skip it or stop")
    parser.add_argument("--chunk-size", type=int, default=64,
                        help="records per task sent to a worker")
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
    except (PreprocessError, ValueError, OSError, ImportError) as error:
        print(f"preprocess: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
