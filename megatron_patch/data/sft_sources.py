"""SFT samples (token ids + assistant mask) from raw JSON/JSONL/parquet or a pre-tokenized set.

A raw source (a ``.jsonl``/``.json``/``.parquet`` file or a directory of them) is tokenized when
the dataset is built. A pre-tokenized source is the output prefix ``P`` of
``megatron-patch preprocess-sft``: Megatron indexed datasets ``P_input_ids_document`` (token ids)
and ``P_loss_mask_document`` (uint8, 1 on assistant tokens), one document per sample.

Samples that cannot be trained on are reported by location and skipped or fatal
(``on_error``): malformed records (see :mod:`.sft_encoder`), samples longer than the sequence
when packing (packing never splits a sample), and samples whose first ``seq_length + 1`` tokens
hold no assistant token when padding (longer samples are truncated on the right).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_patch.data.bad_records import BadRecords, DataError
from megatron_patch.data.readers import input_files, read_records
from megatron_patch.data.sft_encoder import SFT_OUTPUT_KEYS, SFTEncoder
from megatron_patch.data.sft_format import SFT_KEYS
from megatron_patch.tokenizer import Tokenizer

RAW_SUFFIXES = (".jsonl", ".json", ".parquet")
Sample = tuple[numpy.ndarray, numpy.ndarray]  # token ids, assistant mask (same length)


def pretokenized_prefixes(prefix: str | Path) -> dict[str, Path]:
    """Dataset prefix of each key of a pre-tokenized SFT set: ``{prefix}_{key}_document``."""
    return {key: Path(f"{prefix}_{key}_document") for key in SFT_OUTPUT_KEYS}


def is_raw_source(path: str | Path) -> bool:
    """Whether ``path`` is raw SFT data (a JSON/JSONL/parquet file or a directory)."""
    path = Path(path)
    return path.is_dir() or (path.is_file() and path.suffix in RAW_SUFFIXES)


class TokenizedSamples:
    """Samples held in memory, concatenated: ``samples[i]`` is ``(ids, mask)``."""

    def __init__(self, samples: list[Sample]) -> None:
        self.lengths = numpy.array([len(ids) for ids, _ in samples], dtype=numpy.int64)
        self.bounds = numpy.concatenate([[0], numpy.cumsum(self.lengths)])
        self.ids = numpy.concatenate([ids for ids, _ in samples])
        self.mask = numpy.concatenate([mask for _, mask in samples])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> Sample:
        start, end = self.bounds[index], self.bounds[index + 1]
        return self.ids[start:end], self.mask[start:end]


class PretokenizedSamples:
    """The kept documents of a pre-tokenized set (its token and mask datasets)."""

    def __init__(self, ids: IndexedDataset, mask: IndexedDataset, keep: numpy.ndarray) -> None:
        self.ids, self.mask = ids, mask
        self.keep = keep
        self.lengths = self.ids.sequence_lengths[keep].astype(numpy.int64)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> Sample:
        document = int(self.keep[index])
        return self.ids[document], self.mask[document]


def open_pretokenized(prefix: str | Path,
                      mmap: bool = True) -> tuple[IndexedDataset, IndexedDataset]:
    """The token and mask datasets of a pre-tokenized SFT set, checked against each other."""
    paths = pretokenized_prefixes(prefix)
    for path in paths.values():
        for suffix in (".bin", ".idx"):
            if not Path(f"{path}{suffix}").is_file():
                raise FileNotFoundError(
                    f"SFT data {prefix}: {path}{suffix} does not exist; expected a .jsonl/.json/"
                    ".parquet file, a directory of them, or the --output-prefix of "
                    "`megatron-patch preprocess-sft`")
    ids, mask = (IndexedDataset(str(paths[key]), mmap=mmap) for key in SFT_OUTPUT_KEYS)
    if not numpy.array_equal(ids.sequence_lengths, mask.sequence_lengths):
        raise DataError(f"SFT data {prefix}: its input_ids and loss_mask datasets differ in "
                        "documents or lengths")
    return ids, mask


def length_problem(length: int, mask: Callable[[], numpy.ndarray], seq_length: int,
                   packing: bool, train_on_prompt: bool) -> str | None:
    """Why a sample of ``length`` tokens cannot be trained on, or None (``mask`` read lazily)."""
    if length <= seq_length:
        return None
    if packing:
        return (f"{length} tokens, longer than --seq-length {seq_length} (packing never splits "
                "a sample)")
    if not train_on_prompt and not mask()[1:seq_length + 1].any():
        return f"no assistant token within the first --seq-length {seq_length} tokens"
    return None


def _print_rank0(line: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(line, flush=True)


def load_sft_samples(path: str | Path, tokenizer: Tokenizer, seq_length: int, *,
                     packing: bool = False, train_on_prompt: bool = False,
                     on_error: str = "fail", mmap: bool = True
                     ) -> TokenizedSamples | PretokenizedSamples:
    """The trainable samples of ``path``; bad ones are reported (rank 0) or raise ``DataError``."""
    bad = BadRecords(f"sft data {path}", on_error, _print_rank0)
    rules = {"seq_length": seq_length, "packing": packing, "train_on_prompt": train_on_prompt}
    if is_raw_source(path):
        samples: list[Sample] = []
        records = read_records(input_files(path), list(SFT_KEYS))
        for location, result in SFTEncoder(tokenizer).encode_chunk(list(records)):
            if isinstance(result, str):
                bad.add(location, result)
            elif result is not None:
                ids, mask = result["input_ids"][0], result["loss_mask"][0]
                problem = length_problem(len(ids), lambda mask=mask: mask, **rules)
                if problem:
                    bad.add(location, problem)
                else:
                    samples.append((ids, mask))
        source = TokenizedSamples(samples) if samples else None
    else:
        ids, mask = open_pretokenized(path, mmap)
        keep = numpy.ones(len(ids.sequence_lengths), dtype=bool)
        for document in numpy.flatnonzero(ids.sequence_lengths > seq_length):
            length = int(ids.sequence_lengths[document])
            problem = length_problem(length, lambda d=int(document): mask[d], **rules)
            if problem:
                bad.add(f"{path} document {document}", problem)
                keep[document] = False
        source = PretokenizedSamples(ids, mask, numpy.flatnonzero(keep)) if keep.any() else None
    bad.finish()
    if source is None:
        raise DataError(f"SFT data {path}: no trainable samples ({bad.count} skipped)")
    truncated = int((source.lengths > seq_length).sum())
    _print_rank0(f"sft data {path}: {len(source)} samples, {bad.count} skipped"
                  + (f", {truncated} truncated to --seq-length {seq_length}" if truncated else ""))
    return source
