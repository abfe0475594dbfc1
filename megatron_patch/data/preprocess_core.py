"""The loop shared by the preprocessing commands: records -> encoder (worker pool) -> datasets.

The encoder is a picklable :class:`~megatron_patch.data.encoder.RecordEncoder`: its
``encode_chunk(records)`` gives ``(location, result)`` pairs whose result is ``{key: (values,
sequence lengths)}`` for a good record, an error message (str) for a malformed one, or ``None``
for a blank line. Each key becomes one Megatron indexed dataset,
written atomically (:func:`~megatron_patch.data.indexed_io.atomic_builder`).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy
from tqdm import tqdm

from megatron_patch.data.bad_records import ON_ERROR, BadRecords, DataError
from megatron_patch.data.encoder import RecordEncoder
from megatron_patch.data.indexed_io import atomic_builder
from megatron_patch.data.readers import Record
from megatron_patch.tokenizer import TOKENIZERS


@dataclass(frozen=True)
class Output:
    """One dataset to write: its prefix and the dtype of its values."""

    prefix: Path
    dtype: type[numpy.number]


def _chunks(records: Iterable, size: int) -> Iterator[list]:
    iterator = iter(records)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


_WORKER_ENCODER: RecordEncoder | None = None


def _init_worker(encoder: RecordEncoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(chunk: list) -> list:
    return _WORKER_ENCODER.encode_chunk(chunk)


def encoded_chunks(encoder: RecordEncoder, records: Iterable[Record], workers: int,
                   chunk_size: int, stack: ExitStack) -> Iterator[list]:
    """Encoded chunks in input order: in this process, or by a pool of ``workers``."""
    chunks = _chunks(records, chunk_size)
    if workers <= 1:
        return map(encoder.encode_chunk, chunks)
    pool = stack.enter_context(multiprocessing.Pool(workers, _init_worker, (encoder,)))
    return pool.imap(_encode_in_worker, chunks)


def encode_to_datasets(source: str | Path, records: Iterable[Record], encoder: RecordEncoder,
                       outputs: dict[str, Output], *, name: str, counted: Sequence[str],
                       workers: int = 1,
                       on_error: str = "fail", chunk_size: int = 64,
                       progress: bool = True) -> None:
    """Encode ``records`` (read from ``source``) into one dataset per key of ``outputs``.

    ``counted`` names the keys whose values are tokens (for the throughput figures). Malformed
    records raise :class:`DataError` (``on_error="fail"``) or are skipped and listed.
    """
    documents = tokens = 0
    start = time.perf_counter()
    with ExitStack() as stack:
        builders = {key: stack.enter_context(atomic_builder(out.prefix, out.dtype))
                    for key, out in outputs.items()}
        bar = stack.enter_context(tqdm(desc=name, unit=" docs", disable=not progress,
                                       mininterval=1.0, file=sys.stderr))
        bad = BadRecords(name, on_error, lambda line: bar.write(line, file=sys.stderr))
        for results in encoded_chunks(encoder, records, workers, chunk_size, stack):
            for location, result in results:
                if isinstance(result, str):
                    bad.add(location, result)
                elif result is not None:
                    for key, (values, lengths) in result.items():
                        builders[key].add_document(values, lengths)
                    tokens += sum(len(result[key][0]) for key in counted)
                    documents += 1
            bar.update(len(results))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tokens/s",
                                refresh=False)
        if documents == 0:
            detail = f" ({bad.count} malformed records skipped)" if bad.count else ""
            raise DataError(f"{source}: no documents to write{detail}")
    seconds = time.perf_counter() - start
    names = ", ".join(f"{out.prefix}.bin/.idx" for out in outputs.values())
    dropped = f", {bad.count} malformed skipped" if bad.count else ""
    print(f"{name}: {documents} documents{dropped}, {tokens} tokens in {seconds:.1f}s "
          f"({documents / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tokens/s) -> {names}")
    bad.finish()


def add_common_arguments(parser: argparse.ArgumentParser,
                         suffixes: tuple[str, ...]) -> argparse.ArgumentParser:
    """Input, output, tokenizer, workers and error-policy flags (Megatron-LM's names);
    ``suffixes`` are the input file kinds."""
    kinds = "/".join(suffix.lstrip(".") for suffix in suffixes)
    parser.add_argument("--input", required=True,
                        help=f"a {kinds} file, or a directory of such files")
    parser.add_argument("--output-prefix", required=True, help="output path without suffix")
    parser.add_argument("--tokenizer-type", required=True, choices=list(TOKENIZERS))
    parser.add_argument("--tokenizer-model", "--tokenizer-path", dest="tokenizer_path",
                        default=None, help="tokenizer directory or file (not for Byte/Tiny)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="malformed record: skip it (listed with its line) or stop")
    parser.add_argument("--chunk-size", type=int, default=64,
                        help="records per task sent to a worker")
    return parser
